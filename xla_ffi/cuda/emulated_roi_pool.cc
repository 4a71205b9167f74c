// The CUDA RoIPool kernels and handlers (roi_pool_cuda.cu) compiled by the host compiler:
// the emulated targets JaxRoiPool{Forward,Backward}CudaEmulated, CPU FFI handlers that run
// the CUDA kernel bodies block by block on the calling thread (cuda/device_ops.h).
#include "roi_pool_cuda.cu"
