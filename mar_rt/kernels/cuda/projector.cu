// Fan-beam Joseph forward projection and its exact adjoint (DESIGN.md §4, §11).
//
// Notation (pixel-index coordinates; geometry in cm in the `views` table):
//   s = (s_x, s_y)       source of view k;      p_j = centre_k + u_j · e_u,k   bin j
//   d = p_j − s           ray direction;         L = |d|
//   sxp = s_x/pixel + (W−1)/2,   syp = (H−1)/2 − s_y/pixel      source in (col, row) units
//   column branch (|d_x| ≥ |d_y|, ties included): row of the ray at column c  r(c) = a + m·c,
//       m = −d_y/d_x,  a = syp − sxp·m,   w = pixel·L/|d_x|
//   row branch    (|d_x| <  |d_y|):              column of the ray at row r  q(r) = a + m·r,
//       m = −d_x/d_y,  a = sxp − syp·m,   w = pixel·L/|d_y|
//   ray table entry [k][j] = (a, m, w, col), col = 1 for the column branch.
//
// Batching: a thread handles NB ≤ 8 slices (template parameter) and computes each ray's or
// pixel's geometry once for all of them; slices are planes `plane` floats apart.
// Layout: the GPU forward reads column-branch rays from a transposed copy of the image
// (COL_T = true), so that neighbouring threads (bins) read neighbouring addresses.
//
// Forward, one thread per (slice chunk, view, bin):
//   y[k,j] = w · Σ_i (1−f_i)·I[n_i] + f_i·I[n_i + 1],   t_i = a + m·i,  n_i = ⌊t_i⌋,  f_i = t_i − n_i,
//   i along the sampled axis (columns or rows), I read across it, zero outside the image,
//   i clipped to where −1 < t_i < n (the clip only skips zero terms).
//   Equivalently y[k,j] = Σ_i Σ_n w·Λ(t_i − n)·I[n], Λ(t) = max(0, 1 − |t|).
//
// Adjoint, two bodies with the same weights:
//   * gather (GPU default, no atomics), one thread per (slice chunk, pixel (r, c)):
//       x[r,c] = Σ_k Σ_j w_kj · Λ(t_kj(c, r)) · y[k,j],  t = a + m·c − r (column branch) or
//       a + m·r − c (row branch), j restricted to the bins whose rays pass within one pixel
//       of (r, c): ⌈j* − h⌉ ≤ j < ⌈j* − h⌉ + span, j* = (A + B·c + C·r)/(E + F·c + G·r) the
//       projection of the pixel centre onto the detector (bins), h ≥ the detector footprint
//       (in bins) of a disc of one pixel radius round it.  Rays outside the bracket have Λ = 0.
//       Gather table entry [k][j + pad] = (a, m, −1, w) (column branch) or (a, −1, m, w) (row
//       branch), so t = e0 + e1·c + e2·r; zero in the `pad` entries at each end.
//   * scatter (CPU fast path; atomics on a GPU), one thread per ray: the forward walk with
//       each read replaced by an add of w·y·(1−f) and w·y·f.  Same walk, same f: a transpose
//       to float rounding by construction.
// Per-view coefficient entry [k] = (A, B, C, E, F, G, h, span), float64 (FBP) and float32
// (gather adjoint); E + F·c + G·r is the distance U from the source to the pixel along the
// central ray (cm), which FBP reuses.
//
// Precision: ray and view tables are computed in float64 and stored as float32; sample
// positions t_i and all sums are float32.
#include "common.cuh"

// ---------------------------------------------------------------- tables

// Ray parameters of view k, bin j (float64 arithmetic) into ray[0..3].
MR_HD void mr_ray_table_body(const double* views, const double* u, int k, int j, int n_rows,
                             int n_cols, double pixel, float* ray) {
    const double* v = views + (mr_index)k * MR_VIEW_STRIDE;
    const double sx = v[0], sy = v[1];
    const double dx = v[2] + u[j] * v[4] - sx;
    const double dy = v[3] + u[j] * v[5] - sy;
    const double len = sqrt(dx * dx + dy * dy);
    const double sxp = sx / pixel + 0.5 * (n_cols - 1);
    const double syp = 0.5 * (n_rows - 1) - sy / pixel;
    if (fabs(dx) >= fabs(dy)) {
        const double m = -dy / dx;
        ray[0] = (float)(syp - sxp * m);
        ray[1] = (float)m;
        ray[2] = (float)(pixel * len / fabs(dx));
        ray[3] = 1.0f;
    } else {
        const double m = -dx / dy;
        ray[0] = (float)(sxp - syp * m);
        ray[1] = (float)m;
        ray[2] = (float)(pixel * len / fabs(dy));
        ray[3] = 0.0f;
    }
}

// Per-view map pixel (c, r) → fractional detector bin, and the footprint half-width h
// (float64; the float32 copy feeds the gather adjoint, the float64 one FBP).  u0, du: centre
// of bin 0 and bin spacing (cm); u_abs_max ≥ |u − g| over the detector grown by a bin, g the
// detector coordinate of the source's foot.
MR_HD void mr_view_coef_body(const double* views, int k, int n_rows, int n_cols, double pixel,
                             double u0, double du, double u_abs_max, double* out) {
    const double* v = views + (mr_index)k * MR_VIEW_STRIDE;
    const double sx = v[0], sy = v[1], cx = v[2], cy = v[3], ex = v[4], ey = v[5];
    double nx = cx - sx, ny = cy - sy;
    const double dist = sqrt(nx * nx + ny * ny);
    nx /= dist;
    ny /= dist;
    const double g = (sx - cx) * ex + (sy - cy) * ey;
    // P(c, r) − s = (x0 − sx + c·pixel, y0 − sy − r·pixel): N = (P − s)·e_u, U = (P − s)·n
    const double x0 = -0.5 * (n_cols - 1) * pixel, y0 = 0.5 * (n_rows - 1) * pixel;
    const double n0 = (x0 - sx) * ex + (y0 - sy) * ey, nc = pixel * ex, nr = -pixel * ey;
    const double e0 = (x0 - sx) * nx + (y0 - sy) * ny, ec = pixel * nx, er = -pixel * ny;
    // u = g + dist·N/U, j* = (u − u0)/du = (dist·N + (g − u0)·U) / (du·U)
    const double q = g - u0;
    out[0] = (dist * n0 + q * e0) / du;
    out[1] = (dist * nc + q * ec) / du;
    out[2] = (dist * nr + q * er) / du;
    out[3] = e0;
    out[4] = ec;
    out[5] = er;
    // |∇u| ≤ dist/U · √(1 + (N/U)²); U is smallest at a corner of the image grown by a pixel.
    double u_min = 1e300;
    for (int corner = 0; corner < 4; ++corner) {
        const double c = (corner & 1) ? n_cols : -1.0;
        const double r = (corner & 2) ? n_rows : -1.0;
        const double un = e0 + ec * c + er * r;
        u_min = un < u_min ? un : u_min;
    }
    const double slope = u_abs_max / dist;
    const double h = (pixel * dist / u_min * sqrt(1.0 + slope * slope) / du) * 1.001 + 1e-3;
    out[6] = h;
    out[7] = floor(2.0 * h) + 1.0;  // bins within [j* − h, j* + h]: at most this many
}

// ---------------------------------------------------------------- Joseph walk

// Flat index of sample (i along the sampled axis, n across it) in the plane the branch reads.
template <bool COL, bool COL_T>
MR_HD mr_pindex mr_joseph_index(int i, int n, int n_rows, int n_cols) {
    if (COL) return COL_T ? (mr_pindex)i * n_rows + n : (mr_pindex)n * n_cols + i;
    return (mr_pindex)i * n_cols + n;
}

// Walks one ray and calls, for each sample i (t = a + m·i, n0 = ⌊t⌋, f = t − n0),
// op.sample(idx, step, in0, in1, f) or — where both neighbours are inside the image —
// op.inner(idx, step, f): the weights (1 − f) and f belong to the pixels at flat indices idx
// and idx + step of the plane the op reads.  COL: column branch (i = column, n = row).
// COL_T: column-branch rays address a transposed [W][H] plane.
template <bool COL, bool COL_T, class Op>
MR_HD void mr_joseph_walk_branch(float a, float m, int n_rows, int n_cols, Op& op) {
    const int n_major = COL ? n_cols : n_rows;  // sampled axis
    const int n_minor = COL ? n_rows : n_cols;  // interpolated axis
    const mr_pindex step = (COL && !COL_T) ? n_cols : 1;
    // Samples can be nonzero only where −1 < t < n_minor: the clip [lo, hi].  Inside it, the
    // samples with 0 ≤ t < n_minor − 1 need no bounds checks: [in_lo, in_hi].
    float lo = 0.0f, hi = (float)(n_major - 1), in_lo = lo, in_hi = hi;
    if (m != 0.0f) {
        const float t1 = (-1.0f - a) / m, t2 = ((float)n_minor - a) / m;
        const float u1 = (0.0f - a) / m, u2 = ((float)(n_minor - 1) - a) / m;
        lo = mr_maxf(lo, floorf(mr_minf(t1, t2)));
        hi = mr_minf(hi, ceilf(mr_maxf(t1, t2)));
        in_lo = mr_maxf(lo, ceilf(mr_minf(u1, u2)));
        in_hi = mr_minf(hi, floorf(mr_maxf(u1, u2)));
    } else if (!(a > -1.0f && a < (float)n_minor)) {
        return;
    }
    if (lo > hi) return;
    const int i0 = (int)lo, i1 = (int)hi;
    int j0 = in_lo > in_hi ? i1 + 1 : (int)in_lo;
    int j1 = in_lo > in_hi ? i1 : (int)in_hi;
    // t(i) is monotone in i (rounding is monotone), so checking the ends checks the run.
    const float top = (float)(n_minor - 1);
    while (j0 <= j1 && !(a + m * (float)j0 >= 0.0f && a + m * (float)j0 < top)) ++j0;
    while (j1 >= j0 && !(a + m * (float)j1 >= 0.0f && a + m * (float)j1 < top)) --j1;
    if (j0 > j1) j0 = j1 = i1 + 1;  // no inner run: every sample goes through the checks
    for (int i = i0; i <= i1; ++i) {
        if (i == j0) {
            for (; i <= j1; ++i) {
                const float t = a + m * (float)i;
                const float t0 = floorf(t);
                const int n0 = (int)t0;
                op.inner(mr_joseph_index<COL, COL_T>(i, n0, n_rows, n_cols), step, t - t0);
            }
            if (i > i1) break;
        }
        const float t = a + m * (float)i;
        const float t0 = floorf(t);
        const int n0 = (int)t0;
        op.sample(mr_joseph_index<COL, COL_T>(i, n0, n_rows, n_cols), step,
                  (unsigned)n0 < (unsigned)n_minor, (unsigned)(n0 + 1) < (unsigned)n_minor,
                  t - t0);
    }
}

// Reads NB slices (planes `plane` apart, nb of them valid) and sums the interpolated samples.
// Loads go through the read-only cache only for NB > 1: on an H200 that made the 8-slice
// kernel 27% faster and the one-slice kernel 49% slower (benchmarks/RESULTS.md, run 3).
template <int NB>
struct MrJosephRead {
    const float* base;
    mr_index plane;
    int nb;
    float acc[NB];
    MR_HD static float read(const float* p) { return NB > 1 ? mr_load(p) : *p; }
    MR_HD void sample(mr_pindex idx, mr_pindex step, bool in0, bool in1, float f) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
                const float* p = base + b * plane;
                const float v0 = in0 ? read(p + idx) : 0.0f;
                const float v1 = in1 ? read(p + idx + step) : 0.0f;
                acc[b] += (1.0f - f) * v0 + f * v1;
            }
        }
    }
    MR_HD void inner(mr_pindex idx, mr_pindex step, float f) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
                const float* p = base + b * plane;
                acc[b] += (1.0f - f) * read(p + idx) + f * read(p + idx + step);
            }
        }
    }
};

// Adds value·(1 − f) and value·f into one plane (atomically on the device).
struct MrJosephAdd {
    float* base;
    float value;
    MR_HD void sample(mr_pindex idx, mr_pindex step, bool in0, bool in1, float f) {
        if (in0) mr_add(base + idx, (1.0f - f) * value);
        if (in1) mr_add(base + idx + step, f * value);
    }
    MR_HD void inner(mr_pindex idx, mr_pindex step, float f) {
        mr_add(base + idx, (1.0f - f) * value);
        mr_add(base + idx + step, f * value);
    }
};

// Joseph line integrals of one ray through nb ≤ NB slices: img [nb][H][W] (row-branch reads)
// and, when COL_T, img_t [nb][W][H] (column-branch reads); out[b·out_stride].
template <int NB, bool COL_T>
MR_HD void mr_forward_body(const float* img, const float* img_t, mr_index plane, int nb,
                           const float* ray, int n_rows, int n_cols, float* out,
                           mr_index out_stride) {
    MrJosephRead<NB> op;
    op.plane = plane;
    op.nb = nb;
#pragma unroll
    for (int b = 0; b < NB; ++b) op.acc[b] = 0.0f;
    if (ray[3] != 0.0f) {
        op.base = COL_T ? img_t : img;
        mr_joseph_walk_branch<true, COL_T>(ray[0], ray[1], n_rows, n_cols, op);
    } else {
        op.base = img;
        mr_joseph_walk_branch<false, COL_T>(ray[0], ray[1], n_rows, n_cols, op);
    }
#pragma unroll
    for (int b = 0; b < NB; ++b)
        if (b < nb) out[b * out_stride] = op.acc[b] * ray[2];
}

// Scatter adjoint of one ray: adds w·y·(weights) into one image plane [H][W].
MR_HD void mr_adjoint_scatter_body(float* img, const float* ray, float y, int n_rows,
                                   int n_cols) {
    if (y == 0.0f) return;
    MrJosephAdd op = {img, ray[2] * y};
    if (ray[3] != 0.0f)
        mr_joseph_walk_branch<true, false>(ray[0], ray[1], n_rows, n_cols, op);
    else
        mr_joseph_walk_branch<false, false>(ray[0], ray[1], n_rows, n_cols, op);
}

// ---------------------------------------------------------------- gather adjoint

struct MR_ALIGN16 MrGatherEntry {
    float a, p, q, w;
};

// Gather table entry of (view k, padded bin jp = j + pad), from the ray table.
MR_HD void mr_gather_table_body(const float* rays, int k, int jp, int pad, int n_det,
                                float* out) {
    const int j = jp - pad;
    if (j < 0 || j >= n_det) {
        out[0] = out[1] = out[2] = out[3] = 0.0f;
        return;
    }
    const float* ray = rays + ((mr_index)k * n_det + j) * MR_RAY_STRIDE;
    const bool col = ray[3] != 0.0f;
    out[0] = ray[0];
    out[1] = col ? ray[1] : -1.0f;
    out[2] = col ? -1.0f : ray[1];
    out[3] = ray[2];
}

// Adjoint at pixel (r, c) over views k0 ≤ k < k1, added into acc[0..nb): slice b's sinogram
// is sino + b·plane ([V][D]); gtab is the gather table [V][D + 2·pad]; `span` candidate bins
// per view (span ≥ every vcoef[k][7], pad ≥ span).
template <int NB>
MR_HD void mr_adjoint_body(const float* sino, mr_index plane, int nb, const float* gtab,
                           const float* vcoef, int r, int c, int k0, int k1, int n_det, int pad,
                           int span, float* acc) {
    const float fr = (float)r, fc = (float)c;
    const int n_padded = n_det + 2 * pad;
    for (int k = k0; k < k1; ++k) {
        const float* vc = vcoef + (mr_index)k * MR_VCOEF_STRIDE;
        const float den = vc[3] + vc[4] * fc + vc[5] * fr;
        const float js = (vc[0] + vc[1] * fc + vc[2] * fr) / den;
        // First candidate in the padded table; the clamp only moves a run of candidates that
        // lies wholly off the detector onto the zero padding.
        int jp = (int)ceilf(js - vc[6]) + pad;
        jp = jp < 0 ? 0 : (jp > n_padded - span ? n_padded - span : jp);
        const MrGatherEntry* e =
            reinterpret_cast<const MrGatherEntry*>(gtab) + (mr_index)k * n_padded + jp;
        const float* sk = sino + (mr_index)k * n_det;
        for (int s = 0; s < span; ++s) {
            const MrGatherEntry g = e[s];
            const float hw = mr_maxf(1.0f - fabsf(g.a + g.p * fc + g.q * fr), 0.0f) * g.w;
            int j = jp + s - pad;  // off the detector w = 0: any in-range bin will do
            j = j < 0 ? 0 : (j > n_det - 1 ? n_det - 1 : j);
#pragma unroll
            for (int b = 0; b < NB; ++b)
                if (b < nb) acc[b] += hw * sk[b * plane + j];
        }
    }
}

// ---------------------------------------------------------------- device wrappers
#if !defined(MR_HOST_BUILD)
extern "C" __global__ void mr_ray_table(const double* views, const double* u, int n_views,
                                        int n_det, int n_rows, int n_cols, double pixel,
                                        float* rays) {
    const mr_index i = mr_thread_index();
    if (i >= (mr_index)n_views * n_det) return;
    mr_ray_table_body(views, u, (int)(i / n_det), (int)(i % n_det), n_rows, n_cols, pixel,
                      rays + i * MR_RAY_STRIDE);
}

extern "C" __global__ void mr_view_coef(const double* views, int n_views, int n_rows,
                                        int n_cols, double pixel, double u0, double du,
                                        double u_abs_max, double* vcoef) {
    const mr_index k = mr_thread_index();
    if (k >= n_views) return;
    mr_view_coef_body(views, (int)k, n_rows, n_cols, pixel, u0, du, u_abs_max,
                      vcoef + k * MR_VCOEF_STRIDE);
}

extern "C" __global__ void mr_gather_table(const float* rays, int n_views, int n_det, int pad,
                                           float* gtab) {
    const mr_index i = mr_thread_index();
    const int n_padded = n_det + 2 * pad;
    if (i >= (mr_index)n_views * n_padded) return;
    mr_gather_table_body(rays, (int)(i / n_padded), (int)(i % n_padded), pad, n_det,
                         gtab + i * MR_RAY_STRIDE);
}

// Thread i → (slice chunk, ray); img_t is the transposed copy [B][W][H].
#define MR_FORWARD_KERNEL(NAME, NB)                                                         \
    extern "C" __global__ void NAME(const float* img, const float* img_t, const float* rays,  \
                                    int n_batch, int n_rows, int n_cols, int n_views,         \
                                    int n_det, float* sino) {                                 \
        const mr_index i = mr_thread_index();                                               \
        const mr_index n_rays = (mr_index)n_views * n_det;                                  \
        const mr_index n_chunks = (n_batch + NB - 1) / NB;                                  \
        if (i >= n_rays * n_chunks) return;                                                 \
        const mr_index b0 = (i / n_rays) * NB, ray = i % n_rays;                            \
        const mr_index plane = (mr_index)n_rows * n_cols;                                   \
        const int nb = n_batch - b0 < NB ? (int)(n_batch - b0) : NB;                        \
        mr_forward_body<NB, true>(img + b0 * plane, img_t + b0 * plane, plane, nb,          \
                                  rays + ray * MR_RAY_STRIDE, n_rows, n_cols,               \
                                  sino + b0 * n_rays + ray, n_rays);                        \
    }
MR_FORWARD_KERNEL(mr_forward_1, 1)
MR_FORWARD_KERNEL(mr_forward_2, 2)
MR_FORWARD_KERNEL(mr_forward_4, 4)
MR_FORWARD_KERNEL(mr_forward_8, 8)

// img must be zeroed first.
extern "C" __global__ void mr_adjoint_scatter(const float* sino, const float* rays, int n_batch,
                                              int n_rows, int n_cols, int n_views, int n_det,
                                              float* img) {
    const mr_index i = mr_thread_index();
    const mr_index per_slice = (mr_index)n_views * n_det;
    if (i >= per_slice * n_batch) return;
    const mr_index b = i / per_slice, ray = i % per_slice;
    mr_adjoint_scatter_body(img + b * n_rows * n_cols, rays + ray * MR_RAY_STRIDE, sino[i],
                            n_rows, n_cols);
}

// Thread i → (slice chunk, pixel).
#define MR_ADJOINT_KERNEL(NAME, NB)                                                         \
    extern "C" __global__ void NAME(const float* sino, const float* gtab, const float* vcoef, \
                                    int n_batch, int n_rows, int n_cols, int n_views,         \
                                    int n_det, int pad, int span, float* img) {               \
        const mr_index i = mr_thread_index();                                               \
        const mr_index plane = (mr_index)n_rows * n_cols;                                   \
        const mr_index n_chunks = (n_batch + NB - 1) / NB;                                  \
        if (i >= plane * n_chunks) return;                                                  \
        const mr_index b0 = (i / plane) * NB, p = i % plane;                                \
        const mr_index sino_plane = (mr_index)n_views * n_det;                              \
        const int nb = n_batch - b0 < NB ? (int)(n_batch - b0) : NB;                        \
        float acc[NB];                                                                      \
        for (int b = 0; b < NB; ++b) acc[b] = 0.0f;                                         \
        mr_adjoint_body<NB>(sino + b0 * sino_plane, sino_plane, nb, gtab, vcoef,            \
                            (int)(p / n_cols), (int)(p % n_cols), 0, n_views, n_det, pad,   \
                            span, acc);                                                     \
        for (int b = 0; b < NB; ++b)                                                        \
            if (b < nb) img[(b0 + b) * plane + p] = acc[b];                                 \
    }
MR_ADJOINT_KERNEL(mr_adjoint_1, 1)
MR_ADJOINT_KERNEL(mr_adjoint_2, 2)
MR_ADJOINT_KERNEL(mr_adjoint_4, 4)
MR_ADJOINT_KERNEL(mr_adjoint_8, 8)
#endif

// ---------------------------------------------------------------- host entry points
#if defined(MR_HOST_ENTRY)
#include <omp.h>
#include <stdlib.h>
#include <string.h>

MR_HOST_ENTRY void mr_host_ray_table(const double* views, const double* u, int n_views,
                                     int n_det, int n_rows, int n_cols, double pixel,
                                     float* rays) {
    const mr_index n = (mr_index)n_views * n_det;
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i)
        mr_ray_table_body(views, u, (int)(i / n_det), (int)(i % n_det), n_rows, n_cols, pixel,
                          rays + i * MR_RAY_STRIDE);
}

MR_HOST_ENTRY void mr_host_view_coef(const double* views, int n_views, int n_rows, int n_cols,
                                     double pixel, double u0, double du, double u_abs_max,
                                     double* vcoef) {
    for (int k = 0; k < n_views; ++k)
        mr_view_coef_body(views, k, n_rows, n_cols, pixel, u0, du, u_abs_max,
                          vcoef + (mr_index)k * MR_VCOEF_STRIDE);
}

MR_HOST_ENTRY void mr_host_gather_table(const float* rays, int n_views, int n_det, int pad,
                                        float* gtab) {
    const int n_padded = n_det + 2 * pad;
    const mr_index n = (mr_index)n_views * n_padded;
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i)
        mr_gather_table_body(rays, (int)(i / n_padded), (int)(i % n_padded), pad, n_det,
                             gtab + i * MR_RAY_STRIDE);
}

template <int NB, bool COL_T>
static void mr_host_forward_nb(const float* img, const float* img_t, const float* rays,
                               int n_batch, int n_rows, int n_cols, int n_views, int n_det,
                               float* sino) {
    const mr_index n_rays = (mr_index)n_views * n_det;
    const mr_index plane = (mr_index)n_rows * n_cols;
    const mr_index n = n_rays * ((n_batch + NB - 1) / NB);
#pragma omp parallel for schedule(dynamic, 256)
    for (mr_index i = 0; i < n; ++i) {
        const mr_index b0 = (i / n_rays) * NB, ray = i % n_rays;
        const int nb = n_batch - b0 < NB ? (int)(n_batch - b0) : NB;
        mr_forward_body<NB, COL_T>(img + b0 * plane, img_t ? img_t + b0 * plane : img_t, plane,
                                   nb, rays + ray * MR_RAY_STRIDE, n_rows, n_cols,
                                   sino + b0 * n_rays + ray, n_rays);
    }
}

// img_t: NULL, or the transposed copy [B][W][H] (the GPU's layout); nb: slices per thread.
// Returns 0, or 1 for an unsupported nb.
MR_HOST_ENTRY int mr_host_forward(const float* img, const float* img_t, const float* rays,
                                  int n_batch, int n_rows, int n_cols, int n_views, int n_det,
                                  int nb, float* sino) {
#define MR_FWD_CASE(NB)                                                                      \
    case NB:                                                                               \
        if (img_t)                                                                         \
            mr_host_forward_nb<NB, true>(img, img_t, rays, n_batch, n_rows, n_cols, n_views, \
                                         n_det, sino);                                     \
        else                                                                               \
            mr_host_forward_nb<NB, false>(img, img_t, rays, n_batch, n_rows, n_cols,         \
                                          n_views, n_det, sino);                           \
        return 0;
    switch (nb) {
        MR_FWD_CASE(1)
        MR_FWD_CASE(2)
        MR_FWD_CASE(4)
        MR_FWD_CASE(8)
    }
#undef MR_FWD_CASE
    return 1;
}

// Scatter adjoint: each thread adds its rays into a private plane, then the planes are summed.
// Returns 0, or 1 when the scratch planes could not be allocated.
MR_HOST_ENTRY int mr_host_adjoint_scatter(const float* sino, const float* rays, int n_batch,
                                          int n_rows, int n_cols, int n_views, int n_det,
                                          float* img) {
    const mr_index plane = (mr_index)n_rows * n_cols;
    const mr_index per_slice = (mr_index)n_views * n_det;
    const int n_threads = omp_get_max_threads();
    float* scratch = (float*)malloc(sizeof(float) * plane * n_threads);
    if (!scratch) return 1;
    for (int b = 0; b < n_batch; ++b) {
        const float* sb = sino + (mr_index)b * per_slice;
#pragma omp parallel num_threads(n_threads)
        {
            float* mine = scratch + plane * omp_get_thread_num();
            memset(mine, 0, sizeof(float) * plane);
#pragma omp for schedule(dynamic, 256)
            for (mr_index ray = 0; ray < per_slice; ++ray)
                mr_adjoint_scatter_body(mine, rays + ray * MR_RAY_STRIDE, sb[ray], n_rows,
                                        n_cols);
            float* out = img + (mr_index)b * plane;
#pragma omp for schedule(static)
            for (mr_index p = 0; p < plane; ++p) {
                float s = 0.0f;
                for (int t = 0; t < n_threads; ++t) s += scratch[plane * t + p];
                out[p] = s;
            }
        }
    }
    free(scratch);
    return 0;
}

// Gather adjoint (the GPU kernel's body), in tiles of pixels × chunks of views for the cache.
template <int NB>
static void mr_host_adjoint_nb(const float* sino, const float* gtab, const float* vcoef,
                               int n_batch, int n_rows, int n_cols, int n_views, int n_det,
                               int pad, int span, float* img) {
    const int tile_r = 8, tile_c = 32, view_chunk = 40;
    const int n_tr = (n_rows + tile_r - 1) / tile_r, n_tc = (n_cols + tile_c - 1) / tile_c;
    const int n_chunks = (n_batch + NB - 1) / NB;
    const mr_index n_tiles = (mr_index)n_chunks * n_tr * n_tc;
    const mr_index plane = (mr_index)n_rows * n_cols, sino_plane = (mr_index)n_views * n_det;
#pragma omp parallel for schedule(dynamic, 1)
    for (mr_index t = 0; t < n_tiles; ++t) {
        const int b0 = (int)(t / (n_tr * n_tc)) * NB;
        const int nb = n_batch - b0 < NB ? n_batch - b0 : NB;
        const int r0 = (int)(t % (n_tr * n_tc) / n_tc) * tile_r;
        const int c0 = (int)(t % n_tc) * tile_c;
        const int r1 = r0 + tile_r < n_rows ? r0 + tile_r : n_rows;
        const int c1 = c0 + tile_c < n_cols ? c0 + tile_c : n_cols;
        float acc[tile_r * tile_c][NB];
        for (int q = 0; q < tile_r * tile_c; ++q)
            for (int b = 0; b < NB; ++b) acc[q][b] = 0.0f;
        for (int k0 = 0; k0 < n_views; k0 += view_chunk) {
            const int k1 = k0 + view_chunk < n_views ? k0 + view_chunk : n_views;
            for (int r = r0; r < r1; ++r)
                for (int c = c0; c < c1; ++c)
                    mr_adjoint_body<NB>(sino + b0 * sino_plane, sino_plane, nb, gtab, vcoef, r,
                                        c, k0, k1, n_det, pad, span,
                                        acc[(r - r0) * tile_c + (c - c0)]);
        }
        for (int r = r0; r < r1; ++r)
            for (int c = c0; c < c1; ++c)
                for (int b = 0; b < nb; ++b)
                    img[(b0 + b) * plane + (mr_index)r * n_cols + c] =
                        acc[(r - r0) * tile_c + (c - c0)][b];
    }
}

// Returns 0, or 1 for an unsupported nb.
MR_HOST_ENTRY int mr_host_adjoint(const float* sino, const float* gtab, const float* vcoef,
                                  int n_batch, int n_rows, int n_cols, int n_views, int n_det,
                                  int pad, int span, int nb, float* img) {
    switch (nb) {
        case 1:
            mr_host_adjoint_nb<1>(sino, gtab, vcoef, n_batch, n_rows, n_cols, n_views, n_det,
                                  pad, span, img);
            return 0;
        case 2:
            mr_host_adjoint_nb<2>(sino, gtab, vcoef, n_batch, n_rows, n_cols, n_views, n_det,
                                  pad, span, img);
            return 0;
        case 4:
            mr_host_adjoint_nb<4>(sino, gtab, vcoef, n_batch, n_rows, n_cols, n_views, n_det,
                                  pad, span, img);
            return 0;
        case 8:
            mr_host_adjoint_nb<8>(sino, gtab, vcoef, n_batch, n_rows, n_cols, n_views, n_det,
                                  pad, span, img);
            return 0;
    }
    return 1;
}
#endif
