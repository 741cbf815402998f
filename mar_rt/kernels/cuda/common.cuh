// Shared definitions of the mar-rt kernels (DESIGN.md §11).
//
// Each .cu file holds, per operator:
//   * a per-thread body  `MR_HD ... mr_<op>_body(...)`  (__host__ __device__),
//   * a `__global__` wrapper `mr_<op>` (or `mr_<op>_<NB>`, one per slices-per-thread
//     instantiation) that only computes indices and calls the body (compiled by NVRTC
//     through cupy.RawModule, and by `nvcc -cubin` in the CI check),
//   * an `extern "C"` host entry point `mr_host_<op>` that loops over the same body with
//     OpenMP (compiled only in the host build: `nvcc -shared -DMR_HOST_BUILD ...`).
//
// Layouts (C order, float32 unless stated):
//   image     [B][H][W]         row 0 on top, x along columns, y up the rows
//   sinogram  [B][V][D]         views × detector bins
//   views     [V][6]  float64   source (x, y), detector centre (x, y), e_u (x, y), in cm
//   u         [D]     float64   bin centres on the detector, cm
//   rays      [V][D][4]         Joseph ray parameters (a, m, w, col), see projector.cu
//   vcoef     [V][8]            per-view pixel → detector-bin map, see projector.cu
//   gtab      [V][D+2·pad][4]   gather-adjoint table, see projector.cu
#pragma once

#if !defined(__CUDACC_RTC__)
#include <math.h>
#endif

#if defined(__CUDACC__)
#define MR_HD __host__ __device__ __forceinline__
#else
#define MR_HD inline
#endif

// Host entry points exist only in the host build; __global__ wrappers only outside it.
#if defined(MR_HOST_BUILD) && !defined(__CUDA_ARCH__)
#define MR_HOST_ENTRY extern "C" __attribute__((visibility("default")))
#endif

#define MR_RAY_STRIDE 4
#define MR_VCOEF_STRIDE 8
#define MR_VIEW_STRIDE 6

typedef long long mr_index;

// Index of a pixel within one image plane: 32 bits (the kernels' geometry tables refuse
// planes of 2^31 pixels or more), which keeps the Joseph walk's per-sample address arithmetic
// to one multiply-add.  MR_PLANE_INDEX64 restores the 64-bit index: the baseline that
// benchmarks/device_check.py times the default against.
#if defined(MR_PLANE_INDEX64)
typedef long long mr_pindex;
#else
typedef int mr_pindex;
#endif

#define MR_ALIGN16 __align__(16)

#if !defined(MR_HOST_BUILD)
// Linear index of this thread in a 1-D launch.
__device__ __forceinline__ mr_index mr_thread_index() {
    return (mr_index)blockIdx.x * (mr_index)blockDim.x + (mr_index)threadIdx.x;
}
#endif

// min/max without the NaN rules of fminf/fmaxf (which gcc turns into library calls).
MR_HD float mr_minf(float a, float b) { return a < b ? a : b; }
MR_HD float mr_maxf(float a, float b) { return a > b ? a : b; }

// *p for data no thread writes during the kernel: through the read-only (non-coherent) cache
// on the device.  MR_NO_LDG: a plain load (the benchmark baseline, like MR_PLANE_INDEX64).
MR_HD float mr_load(const float* p) {
#if defined(__CUDA_ARCH__) && !defined(MR_NO_LDG)
    return __ldg(p);
#else
    return *p;
#endif
}

// *p += v: an atomic add on the device, a plain add on the host (each host thread adds into
// its own buffer).
MR_HD void mr_add(float* p, float v) {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
}
