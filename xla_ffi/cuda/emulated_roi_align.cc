// The CUDA RoIAlign forward kernels and handler (roi_align_cuda.cu) compiled by the host
// compiler: the emulated target, a CPU FFI handler that runs the CUDA kernel bodies block by
// block on the calling thread (cuda/device_ops.h).
#include "roi_align_cuda.cu"
