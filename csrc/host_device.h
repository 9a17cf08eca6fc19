// MPLUG_HD marks small functions shared by the CUDA kernels and the host-side unit test.
#pragma once

#if defined(__CUDACC__)
#define MPLUG_HD __host__ __device__ __forceinline__
#else
#define MPLUG_HD inline
#endif
