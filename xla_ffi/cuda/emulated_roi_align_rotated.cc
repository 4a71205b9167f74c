// The CUDA roi_align_rotated kernels and handlers (cuda/roi_align_rotated.cu) compiled by
// the host compiler: the emulated targets JaxRoiAlignRotated{Forward,Backward}CudaEmulated,
// CPU FFI handlers that run the CUDA kernel bodies block by block on the calling thread
// (cuda/device_ops.h).
#include "cuda/roi_align_rotated.cu"
