// The CUDA RoIAlign kernels and handlers (cuda/roi_align.cu) compiled by the host compiler:
// the emulated targets JaxRoiAlign{Forward,Backward}CudaEmulated, CPU FFI handlers that run
// the CUDA kernel bodies block by block on the calling thread (cuda/device_ops.h).
#include "cuda/roi_align.cu"
