// Metal trace and linear interpolation (LI) along the detector (DESIGN.md §6).
//
// Notation (mar_rt/ct/mar.py holds the reference):
//   FP(M)   forward projection of the metal mask, cm (computed by projector.cu)
//   Tr      metal trace, FP(M) > threshold (0 by default), uint8 [B][V][D]
//   LI(P)   per view: each trace bin j takes P[l] + (P[r] − P[l])·(j − l)/(r − l), l and r the
//           nearest non-trace bins left and right; a run that reaches a detector end takes
//           the nearest outside value; a view wholly in the trace is left unchanged.
// Precision: LI in float64, rounded to float32 once.
#include "common.cuh"

MR_HD unsigned char mr_trace_body(float projection, float threshold) {
    return projection > threshold ? 1 : 0;
}

// LI of one view (one sinogram row of n bins).
MR_HD void mr_li_body(const float* p, const unsigned char* trace, int n_det, float* out) {
    int j = 0;
    while (j < n_det) {
        if (!trace[j]) {
            out[j] = p[j];
            ++j;
            continue;
        }
        const int start = j;
        while (j < n_det && trace[j]) ++j;
        const int left = start - 1, right = j;  // nearest outside bins (may be off the detector)
        const bool has_l = left >= 0, has_r = right < n_det;
        const double pl = has_l ? (double)p[left] : 0.0;
        const double pr = has_r ? (double)p[right] : 0.0;
        for (int i = start; i < right; ++i) {
            double v;
            if (has_l && has_r)
                v = pl + (pr - pl) * ((double)(i - left) / (double)(right - left));
            else if (has_l)
                v = pl;
            else if (has_r)
                v = pr;
            else
                v = (double)p[i];
            out[i] = (float)v;
        }
    }
}

// ---------------------------------------------------------------- device wrappers
#if !defined(MR_HOST_BUILD)
extern "C" __global__ void mr_trace(const float* projection, long long n, float threshold,
                                    unsigned char* trace) {
    const mr_index i = mr_thread_index();
    if (i >= n) return;
    trace[i] = mr_trace_body(projection[i], threshold);
}

// One thread per (slice, view).
extern "C" __global__ void mr_li(const float* p, const unsigned char* trace, int n_rows_total,
                                 int n_det, float* out) {
    const mr_index row = mr_thread_index();
    if (row >= n_rows_total) return;
    mr_li_body(p + row * n_det, trace + row * n_det, n_det, out + row * n_det);
}
#endif

// ---------------------------------------------------------------- host entry points
#if defined(MR_HOST_ENTRY)
MR_HOST_ENTRY void mr_host_trace(const float* projection, long long n, float threshold,
                                 unsigned char* trace) {
#pragma omp parallel for schedule(static)
    for (mr_index i = 0; i < n; ++i) trace[i] = mr_trace_body(projection[i], threshold);
}

MR_HOST_ENTRY void mr_host_li(const float* p, const unsigned char* trace, int n_rows_total,
                              int n_det, float* out) {
#pragma omp parallel for schedule(static)
    for (int row = 0; row < n_rows_total; ++row)
        mr_li_body(p + (mr_index)row * n_det, trace + (mr_index)row * n_det, n_det,
                   out + (mr_index)row * n_det);
}
#endif
