// The CUDA ps_roi_align kernels and handlers (cuda/ps_roi_align.cu) compiled by the host
// compiler: the emulated targets JaxRoiPsAlign{Forward,Backward}CudaEmulated, CPU FFI
// handlers that run the CUDA kernel bodies block by block on the calling thread
// (cuda/device_ops.h).
#include "cuda/ps_roi_align.cu"
