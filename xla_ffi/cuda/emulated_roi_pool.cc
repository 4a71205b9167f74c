// The CUDA RoIPool kernels and handlers (cuda/roi_pool.cu) compiled by the host compiler:
// the emulated targets JaxRoiPool{Forward,Backward}CudaEmulated, CPU FFI handlers that run
// the CUDA kernel bodies block by block on the calling thread (cuda/device_ops.h).
#include "cuda/roi_pool.cu"
