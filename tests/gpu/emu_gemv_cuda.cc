// kernels/cuda/gemv_cuda.cu compiled as C++ for the CPU emulation of tests/gpu/cuda_emu.h.
#define HELIX_CUDA_EMULATION 1
#include "tests/gpu/cuda_emu.h"
// clang-format off
#include "kernels/cuda/gemv_cuda.cu"
// clang-format on
