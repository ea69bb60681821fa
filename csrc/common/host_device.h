// MB_HD: a function for host and device code alike (nvcc), or a plain inline
// function in host-only builds. The shared arithmetic headers use it.
#pragma once

#if defined(__CUDACC__)
#define MB_HD __host__ __device__ __forceinline__
#else
#define MB_HD inline
#endif
