// Elementwise runtime kernels: the fused IR-SDE posterior step and OSRO's normalisation and
// fusion (DESIGN.md §7.3, §8).
//
// Notation (mar_rt/models/sde.py and mar_rt/runtime/osro.py hold the references):
//   x, μ, ε̂, z       state, mean, predicted noise, fresh standard normal noise
//   a, b, c           per-step scalars:  x ← μ + a·(x − μ) − b·ε̂ + c·z   (z absent when c = 0)
//   V                 valid pixels (uint8, 1 = used for statistics, i.e. not metal)
//   n, S1, S2         Σ_V 1, Σ_V x, Σ_V x² per slice (float64)
//   m, s              S1/n and √(S2/n − m²) (population std), n clamped to ≥ 1
//   Norm(x → ref)     (x − m_x)·g + m_ref,  g = s_ref/s_x, or 1 when s_x ≤ 1e-12
//   fuse              α·a + β·b with β = 1 − α computed by the caller in float64
#include "common.cuh"

#define MR_STD_FLOOR 1e-12

MR_HD float mr_sde_step_body(float x, float eps, float mu, const float* z, mr_index i, float a,
                             float b, float c) {
    const float out = mu + a * (x - mu) - b * eps;
    return z ? out + c * z[i] : out;
}

// Adds n, S1, S2 of x[begin : end : stride] over valid pixels into acc[3] (float64).
MR_HD void mr_masked_sums_body(const float* x, const unsigned char* valid, mr_index begin,
                               mr_index end, mr_index stride, double* acc) {
    double n = 0.0, s1 = 0.0, s2 = 0.0;
    for (mr_index i = begin; i < end; i += stride) {
        if (valid[i]) {
            const double v = (double)x[i];
            n += 1.0;
            s1 += v;
            s2 += v * v;
        }
    }
    acc[0] += n;
    acc[1] += s1;
    acc[2] += s2;
}

// Mean and std (float32) from the sums.
MR_HD void mr_mean_std(const double* sums, float* mean, float* std) {
    const double n = sums[0] > 1.0 ? sums[0] : 1.0;
    const double m = sums[1] / n;
    const double var = sums[2] / n - m * m;
    *mean = (float)m;
    *std = (float)(var > 0.0 ? sqrt(var) : 0.0);
}

MR_HD float mr_match_apply_body(float x, const double* sums_src, const double* sums_ref) {
    float m_s, s_s, m_r, s_r;
    mr_mean_std(sums_src, &m_s, &s_s);
    mr_mean_std(sums_ref, &m_r, &s_r);
    const float gain = s_s > (float)MR_STD_FLOOR ? s_r / s_s : 1.0f;
    return (x - m_s) * gain + m_r;
}

MR_HD float mr_fuse_body(float a, float b, float alpha, float beta) {
    return alpha * a + beta * b;
}

// ---------------------------------------------------------------- device wrappers
#if !defined(MR_HOST_BUILD)
extern "C" __global__ void mr_sde_step(const float* x, const float* eps, const float* mu,
                                       const float* z, long long n, float a, float b, float c,
                                       float* out) {
    const mr_index i = mr_thread_index();
    if (i >= n) return;
    out[i] = mr_sde_step_body(x[i], eps[i], mu[i], z, i, a, b, c);
}

// Grid (blocks per slice, slices); block size 256; sums [B][3] zeroed first.
extern "C" __global__ void mr_masked_sums(const float* x, const unsigned char* valid,
                                          long long plane, double* sums) {
    __shared__ double part[3][256];
    const mr_index b = blockIdx.y;
    double acc[3] = {0.0, 0.0, 0.0};
    const mr_index stride = (mr_index)gridDim.x * blockDim.x;
    mr_masked_sums_body(x + b * plane, valid + b * plane,
                        (mr_index)blockIdx.x * blockDim.x + threadIdx.x, plane, stride, acc);
    for (int q = 0; q < 3; ++q) part[q][threadIdx.x] = acc[q];
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half)
            for (int q = 0; q < 3; ++q) part[q][threadIdx.x] += part[q][threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        for (int q = 0; q < 3; ++q) atomicAdd(sums + b * 3 + q, part[q][0]);
}

extern "C" __global__ void mr_match_apply(const float* x, const double* sums_src,
                                          const double* sums_ref, int n_batch, long long plane,
                                          float* out) {
    const mr_index i = mr_thread_index();
    if (i >= plane * n_batch) return;
    const mr_index b = i / plane;
    out[i] = mr_match_apply_body(x[i], sums_src + 3 * b, sums_ref + 3 * b);
}

extern "C" __global__ void mr_fuse(const float* a, const float* b, long long n, float alpha,
                                   float beta, float* out) {
    const mr_index i = mr_thread_index();
    if (i >= n) return;
    out[i] = mr_fuse_body(a[i], b[i], alpha, beta);
}
#endif

// ---------------------------------------------------------------- host entry points
#if defined(MR_HOST_ENTRY)
MR_HOST_ENTRY void mr_host_sde_step(const float* x, const float* eps, const float* mu,
                                    const float* z, long long n, float a, float b, float c,
                                    float* out) {
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i) out[i] = mr_sde_step_body(x[i], eps[i], mu[i], z, i, a, b, c);
}

// sums [B][3] are overwritten.
MR_HOST_ENTRY void mr_host_masked_sums(const float* x, const unsigned char* valid, int n_batch,
                                       long long plane, double* sums) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < n_batch; ++b) {
        double* acc = sums + 3 * b;
        acc[0] = acc[1] = acc[2] = 0.0;
        mr_masked_sums_body(x + b * plane, valid + b * plane, 0, plane, 1, acc);
    }
}

MR_HOST_ENTRY void mr_host_match_apply(const float* x, const double* sums_src,
                                       const double* sums_ref, int n_batch, long long plane,
                                       float* out) {
    const mr_index n = plane * n_batch;
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i) {
        const mr_index b = i / plane;
        out[i] = mr_match_apply_body(x[i], sums_src + 3 * b, sums_ref + 3 * b);
    }
}

MR_HOST_ENTRY void mr_host_fuse(const float* a, const float* b, long long n, float alpha,
                                float beta, float* out) {
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i) out[i] = mr_fuse_body(a[i], b[i], alpha, beta);
}
#endif
