// Fan-beam FBP: cosine pre-weighting and pixel-driven back-projection (DESIGN.md §4).
// The ramp filter between the two runs through an FFT library (cupy.fft / torch.fft).
//
// Notation (lengths in cm; mar_rt/ct/fbp.py holds the reference):
//   R, D        source → isocentre, isocentre → detector;   V views;   n bins, u_j physical
//   a_j         u_j · R/(R + D)                  bin centre scaled to the isocentre
//   p'          p · R/√(R² + a_j²)               cosine pre-weighted sinogram
//   q           filtered p' (same bins)
//   U(c, r)     E + F·c + G·r   distance source → pixel along the central ray (vcoef, float64)
//   j*(c, r)    (A + B·c + C·r)/U               detector bin hit by the ray through the pixel
//   f(r, c)     Σ_k (R²·π/V)/U² · q_k(j*)        q linearly interpolated, 0 off the detector
// One thread per (slice chunk of NB ≤ 8, pixel): positions and weights are shared by the chunk.
//
// Precision: weights and positions in float64 (as the reference builds its float64 table),
// each interpolation weight rounded to float32, sums in float32.
#include "common.cuh"

// p'[k, j] = p[k, j] · R/√(R² + (u_j·iso)²), iso = R/(R + D); the weight in float64.
MR_HD float mr_fbp_weight_body(float p, const double* u, int j, double r_src, double iso) {
    const double a = u[j] * iso;
    return p * (float)(r_src / sqrt(r_src * r_src + a * a));
}

// Back-projection at pixel (r, c) over views k0 ≤ k < k1, added into acc[0..nb): slice b's
// filtered sinogram is q + b·plane ([V][n]).  vcoef: float64 [V][8] from mr_view_coef;
// scale = R²·π/V.  Positions and weights are computed once for all nb ≤ NB slices.
template <int NB>
MR_HD void mr_fbp_body(const float* q, mr_index plane, int nb, const double* vcoef, int r, int c,
                       int k0, int k1, int n_det, double scale, float* acc) {
    const double fr = (double)r, fc = (double)c;
    for (int k = k0; k < k1; ++k) {
        const double* vc = vcoef + (mr_index)k * MR_VCOEF_STRIDE;
        const double inv_t = 1.0 / (vc[3] + vc[4] * fc + vc[5] * fr);
        const double pos = (vc[0] + vc[1] * fc + vc[2] * fr) * inv_t;
        const double j0f = floor(pos);
        const double frac = pos - j0f;
        const double weight = scale * inv_t * inv_t;
        const int j0 = (int)j0f;
        const bool in0 = (unsigned)j0 < (unsigned)n_det;
        const bool in1 = (unsigned)(j0 + 1) < (unsigned)n_det;
        const float w0 = (float)((1.0 - frac) * weight), w1 = (float)(frac * weight);
        const float* qk = q + (mr_index)k * n_det;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
                const float* qb = qk + b * plane;
                const float v0 = in0 ? qb[j0] : 0.0f;
                const float v1 = in1 ? qb[j0 + 1] : 0.0f;
                acc[b] += w0 * v0 + w1 * v1;
            }
        }
    }
}

// ---------------------------------------------------------------- device wrappers
#if !defined(MR_HOST_BUILD)
extern "C" __global__ void mr_fbp_weight(const float* p, const double* u, int n_rows_total,
                                         int n_det, double r_src, double iso, float* out) {
    const mr_index i = mr_thread_index();
    if (i >= (mr_index)n_rows_total * n_det) return;
    out[i] = mr_fbp_weight_body(p[i], u, (int)(i % n_det), r_src, iso);
}

// Thread i → (slice chunk, pixel).
#define MR_FBP_KERNEL(NAME, NB)                                                             \
    extern "C" __global__ void NAME(const float* q, const double* vcoef, int n_batch,         \
                                    int n_rows, int n_cols, int n_views, int n_det,           \
                                    double scale, float* img) {                               \
        const mr_index i = mr_thread_index();                                               \
        const mr_index plane = (mr_index)n_rows * n_cols;                                   \
        const mr_index n_chunks = (n_batch + NB - 1) / NB;                                  \
        if (i >= plane * n_chunks) return;                                                  \
        const mr_index b0 = (i / plane) * NB, p = i % plane;                                \
        const mr_index q_plane = (mr_index)n_views * n_det;                                 \
        const int nb = n_batch - b0 < NB ? (int)(n_batch - b0) : NB;                        \
        float acc[NB];                                                                      \
        for (int b = 0; b < NB; ++b) acc[b] = 0.0f;                                         \
        mr_fbp_body<NB>(q + b0 * q_plane, q_plane, nb, vcoef, (int)(p / n_cols),            \
                        (int)(p % n_cols), 0, n_views, n_det, scale, acc);                  \
        for (int b = 0; b < NB; ++b)                                                        \
            if (b < nb) img[(b0 + b) * plane + p] = acc[b];                                 \
    }
MR_FBP_KERNEL(mr_fbp_1, 1)
MR_FBP_KERNEL(mr_fbp_2, 2)
MR_FBP_KERNEL(mr_fbp_4, 4)
MR_FBP_KERNEL(mr_fbp_8, 8)
#endif

// ---------------------------------------------------------------- host entry points
#if defined(MR_HOST_ENTRY)
MR_HOST_ENTRY void mr_host_fbp_weight(const float* p, const double* u, int n_rows_total,
                                      int n_det, double r_src, double iso, float* out) {
    const mr_index n = (mr_index)n_rows_total * n_det;
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i)
        out[i] = mr_fbp_weight_body(p[i], u, (int)(i % n_det), r_src, iso);
}

// In tiles of pixels × chunks of views, as the gather adjoint.
template <int NB>
static void mr_host_fbp_nb(const float* q, const double* vcoef, int n_batch, int n_rows,
                           int n_cols, int n_views, int n_det, double scale, float* img) {
    const int tile_r = 8, tile_c = 32, view_chunk = 40;
    const int n_tr = (n_rows + tile_r - 1) / tile_r, n_tc = (n_cols + tile_c - 1) / tile_c;
    const int n_chunks = (n_batch + NB - 1) / NB;
    const mr_index n_tiles = (mr_index)n_chunks * n_tr * n_tc;
    const mr_index plane = (mr_index)n_rows * n_cols, q_plane = (mr_index)n_views * n_det;
#pragma omp parallel for schedule(dynamic, 1)
    for (mr_index t = 0; t < n_tiles; ++t) {
        const int b0 = (int)(t / (n_tr * n_tc)) * NB;
        const int nb = n_batch - b0 < NB ? n_batch - b0 : NB;
        const int r0 = (int)(t % (n_tr * n_tc) / n_tc) * tile_r;
        const int c0 = (int)(t % n_tc) * tile_c;
        const int r1 = r0 + tile_r < n_rows ? r0 + tile_r : n_rows;
        const int c1 = c0 + tile_c < n_cols ? c0 + tile_c : n_cols;
        float acc[tile_r * tile_c][NB];
        for (int i = 0; i < tile_r * tile_c; ++i)
            for (int b = 0; b < NB; ++b) acc[i][b] = 0.0f;
        for (int k0 = 0; k0 < n_views; k0 += view_chunk) {
            const int k1 = k0 + view_chunk < n_views ? k0 + view_chunk : n_views;
            for (int r = r0; r < r1; ++r)
                for (int c = c0; c < c1; ++c)
                    mr_fbp_body<NB>(q + b0 * q_plane, q_plane, nb, vcoef, r, c, k0, k1, n_det,
                                    scale, acc[(r - r0) * tile_c + (c - c0)]);
        }
        for (int r = r0; r < r1; ++r)
            for (int c = c0; c < c1; ++c)
                for (int b = 0; b < nb; ++b)
                    img[(b0 + b) * plane + (mr_index)r * n_cols + c] =
                        acc[(r - r0) * tile_c + (c - c0)][b];
    }
}

// nb: slices per thread (1, 2, 4, 8).  Returns 0, or 1 for an unsupported nb.
MR_HOST_ENTRY int mr_host_fbp(const float* q, const double* vcoef, int n_batch, int n_rows,
                              int n_cols, int n_views, int n_det, double scale, int nb,
                              float* img) {
    switch (nb) {
        case 1:
            mr_host_fbp_nb<1>(q, vcoef, n_batch, n_rows, n_cols, n_views, n_det, scale, img);
            return 0;
        case 2:
            mr_host_fbp_nb<2>(q, vcoef, n_batch, n_rows, n_cols, n_views, n_det, scale, img);
            return 0;
        case 4:
            mr_host_fbp_nb<4>(q, vcoef, n_batch, n_rows, n_cols, n_views, n_det, scale, img);
            return 0;
        case 8:
            mr_host_fbp_nb<8>(q, vcoef, n_batch, n_rows, n_cols, n_views, n_det, scale, img);
            return 0;
    }
    return 1;
}
#endif
