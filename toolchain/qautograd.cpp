// bitfold fast-QAT autograd nodes: the fused integer quantizers of bitfold.toolchain.fastquant
// (_QuantFromValue, _QuantFromAbsMax) as torch operators whose forward and backward run in C++.
//
// On a small network a fused quantizer spends most of its time not in arithmetic but in Python: the
// autograd Function's call machinery and a dozen scalar-sized tensor operations around the one-pass
// kernels (the scale from its parameter or statistic, the products' sums, the parameter's gradient),
// each a Python-to-C++ round trip. Here the same operations are the same ATen calls made from C++,
// in the same order, and the tensor-sized work is the kernels of qkernels.c (included below), so the
// results are bit-identical to the Python Functions (tests compare them with torch.equal). Where the
// kernels do not take a tensor (layout, dtype, device) the tensor operations of the Python Functions
// run, also from here.
//
// Also nodes whose reference is a method's own tensor operations rather than a Python Function: AdaQAT's
// learned range and scale (learned_scale: the formulas autograd applies to Brevitas's scalar modules) and
// weight normalisation (tanh_normalize) and product-form cost penalty (product_cost), ASQ's POST weight
// (post_snap) - each tested against those operations.
//
// Built on first use by bitfold.toolchain.qkernels against the installed torch; loaded with
// torch.ops.load_library; operators torch.ops.bitfold_q.quant_value / quant_absmax / quant_linear / quant_range / asq_step /
// row_stats / asq_adapter / asq_site / learned_scale / quant_learned / tanh_learned / tanh_learned_linear / tanh_normalize / post_snap / product_cost / width_step,
// and ordered_sum / ordered_sum_width (torch's summation order as the passes reproduce it; for the tests).
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

extern "C" {
#define restrict __restrict__
#include "qkernels.c"
#undef restrict
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Row-major strides on every dimension, size-1 ones included (qkernels.standard).
bool standard(const Tensor& t) {
    int64_t expect = 1;
    for (int64_t d = t.dim() - 1; d >= 0; --d) {
        if (t.stride(d) != expect) return false;
        expect *= t.size(d);
    }
    return true;
}

struct Layout {
    bool ok;
    int64_t rows, inner;
    int per_row;
};

// qkernels.layout: float32 CPU row-major x; s one value or one per row of x.
Layout layout(const Tensor& x, const Tensor& s) {
    const Layout no{false, 0, 0, 0};
    if (x.scalar_type() != at::kFloat || s.scalar_type() != at::kFloat || !x.device().is_cpu() ||
        !s.device().is_cpu() || x.dim() == 0 || s.dim() > x.dim() || !standard(x))
        return no;
    const int64_t n = x.numel();
    if (s.numel() == 1) return {true, 1, n, 0};
    if (x.size(0) > 0 && s.dim() == x.dim() && s.size(0) == x.size(0) && s.numel() == x.size(0) && s.is_contiguous())
        return {true, x.size(0), n / x.size(0), 1};
    return no;
}

// autograd's gradient of mat1 and mat2 in mm/addmm (mm_mat1_backward / mm_mat2_backward, alpha 1): the same
// products, chosen by the operand's strides as autograd chooses them (a column-major operand gets its
// gradient computed transposed).
Tensor mat1_grad(const Tensor& grad, const Tensor& mat2, const Tensor& mat1) {
    if (mat1.stride(0) == 1 && mat1.stride(1) == mat1.size(0)) return mat2.mm(grad.t()).t();
    return grad.mm(mat2.t());
}

Tensor mat2_grad(const Tensor& grad, const Tensor& mat1, const Tensor& mat2) {
    if (mat2.stride(0) == 1 && mat2.stride(1) == mat2.size(0)) return grad.t().mm(mat1).t();
    return mat1.t().mm(grad);
}

// The product half of a quantized weight's node with F.linear of a 2-d input (QuantLinear, TanhLearnedLinear):
// the gradients of x, of the quantized weight wq (for the quantizer's backward) and of the bias, each where
// wanted - at::linear's addmm / mm under autograd (mat1_grad; mat2_grad and the transpose's; the bias's summed
// to its shape). The saved tensors' first three: x, wq, the bias (undefined without one); needs_input_grad
// counts the tensors given, so the bias's index only when there is one.
struct LinearGrads {
    Tensor x, wq, b;
};

LinearGrads linear_grads(AutogradContext* ctx, const Tensor& g, const variable_list& v, bool need_wq) {
    const Tensor &x = v[0], &wq = v[1], &b = v[2];
    LinearGrads r;
    if (ctx->needs_input_grad(0)) r.x = mat1_grad(g, wq.t(), x);
    if (need_wq) r.wq = mat2_grad(g, x, wq.t()).t();
    if (b.defined() && ctx->needs_input_grad(2)) r.b = at::sum_to(g, b.sizes());
    return r;
}

// qkernels.grad_fits
bool grad_fits(const Tensor& g, const Tensor& x) {
    return g.scalar_type() == at::kFloat && g.sizes() == x.sizes() && standard(g);
}

float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// A 0-dim float32 CPU tensor: scalar arithmetic on it is done here in float, as ATen's kernels do it
// (one dispatch each saved on a training step's dozen scalar operations).
bool scalar_f32(const Tensor& t) { return t.dim() == 0 && t.scalar_type() == at::kFloat && t.device().is_cpu(); }

float fval(const Tensor& t) { return *t.data_ptr<float>(); }

Tensor scalar_of(float v, const Tensor& like) {
    Tensor t = at::empty({}, like.options());
    *t.data_ptr<float>() = v;
    return t;
}

// max(|v|, min) / thr as abs, clamp_min (its Scalar cast to float; NaN kept, as std::max keeps it) and
// div compute it in float
float scale_of(float v, std::optional<double> min_val, float thr) {
    float a = fabsf(v);
    if (min_val) {
        const float m = (float)*min_val;
        a = a < m ? m : a;
    }
    return a / thr;
}

// The scale max(v, min_val) / thr, v = |value| (take_abs) or the max-abs statistic in the scale's
// shape: ATen's abs, clamp_min and div, or their float arithmetic on a 0-dim v and thr.
Tensor scale_tensor(const Tensor& v, bool take_abs, std::optional<double> min_val, const Tensor& thr) {
    if (scalar_f32(v) && scalar_f32(thr))   // (|v| is v for a statistic: it is >= 0)
        return scalar_of(scale_of(fval(v), min_val, fval(thr)), v);
    Tensor s = take_abs ? at::abs(v) : v;
    if (min_val) s = at::clamp_min(s, *min_val);
    return s / thr;
}

// sgn of a real float as ATen's sign kernel: (0 < v) - (v < 0), so +0 for +-0 and NaN
float sgn_of_f(float v) { return (float)((0.0f < v) - (v < 0.0f)); }

// fastquant._grads: a clamp's backward cutting outside [lo, hi] (``cut``; only the upper bound when
// ``above_lo``), round straight-through, the scale's two uses summed to its shape.
void grads_ops(const Tensor& g, const Tensor& y, const Tensor& s, const Tensor& c, const Tensor& q, bool cut,
               double lo, double hi, bool above_lo, bool need_x, bool need_s, Tensor& grad_x, Tensor& grad_s) {
    Tensor grad_c = g * s;
    if (cut) {
        grad_c = at::threshold_backward(grad_c, at::rsub(q, hi + 0.5), 0);
        if (!above_lo) grad_c = at::threshold_backward(grad_c, at::sub(q, lo - 0.5), 0);
    }
    if (need_x) grad_x = grad_c / s;
    if (need_s) grad_s = at::sum_to(g * c, s.sizes()) - at::sum_to(grad_c * (y / s), s.sizes());
}

// The passes split over torch's intra-op threads (at::parallel_for: torch.set_num_threads applies;
// one thread runs inline): by rows for a per-row scale, by element ranges for one scale. Each element
// is computed alone, so any split gives the same values.
constexpr int64_t kGrain = 1 << 15;

template <typename F>
void split(const Layout& lay, F body) {   // body(row0, rows, off, len): a block of rows, or a range of one row
    if (lay.per_row) {
        const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, lay.inner));
        at::parallel_for(0, lay.rows, grain, [&](int64_t b, int64_t e) { body(b, e - b, b * lay.inner, lay.inner); });
    } else {
        at::parallel_for(0, lay.inner, kGrain, [&](int64_t b, int64_t e) { body(0, 1, b, e - b); });
    }
}

// The scale a pass divides by (sd, laid out as ``lay`` says) and the one it multiplies by: sm, one value
// (ASQ's: sd = s * beta per sample, sm = s), or sd itself when sm is undefined.
struct Scales {
    const float *d, *m;
    int per_row_m;
    Scales(const Tensor& sd, const Tensor& sm, const Layout& lay)
        : d(sd.data_ptr<float>()), m(sm.defined() ? sm.data_ptr<float>() : d), per_row_m(sm.defined() ? 0 : lay.per_row) {}
};

// The one-pass forward (bfq_forward): clamp(round(relu?(x) / sd), lo, hi) * sm.
Tensor kernel_forward(const Tensor& x, const Tensor& sd, const Layout& lay, double lo, double hi, bool relu,
                      const Tensor& sm = Tensor()) {
    Tensor out = at::empty_like(x);
    const Scales sc(sd, sm, lay);
    const float* xp = x.data_ptr<float>();
    float* op = out.data_ptr<float>();
    split(lay, [&](int64_t row, int64_t rows, int64_t off, int64_t len) {
        bfq_forward(xp + off, op + off, rows, len, sc.d + (lay.per_row ? row : 0), lay.per_row,
                    sc.m + (sc.per_row_m ? row : 0), sc.per_row_m, (float)lo, (float)hi, relu);
    });
    return out;
}

// The one-pass backward (bfq_backward): the input's gradient (need_x) and the two products whose sums
// are the scale's gradient (need_s), each undefined when not needed.
struct Products {
    Tensor gx, p1, p2;
};

Products kernel_backward(const Tensor& x, const Tensor& g, const Tensor& sd, const Layout& lay, double lo, double hi,
                         bool relu, int mask, bool need_x, bool need_s, const Tensor& sm = Tensor()) {
    Products o{need_x ? at::empty_like(x) : Tensor(), need_s ? at::empty_like(x) : Tensor(),
               need_s ? at::empty_like(x) : Tensor()};
    const Scales sc(sd, sm, lay);
    const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>();
    float *gxp = fptr(o.gx), *p1p = fptr(o.p1), *p2p = fptr(o.p2);
    split(lay, [&](int64_t row, int64_t rows, int64_t off, int64_t len) {
        bfq_backward(xp + off, gp + off, rows, len, sc.d + (lay.per_row ? row : 0), lay.per_row,
                     sc.m + (sc.per_row_m ? row : 0), sc.per_row_m, (float)lo, (float)hi, relu, mask,
                     gxp ? gxp + off : nullptr, p1p ? p1p + off : nullptr, p2p ? p2p + off : nullptr);
    });
    return o;
}

// torch's vector width for a float sum (bfq_sum_ordered: the order of ATen's CPU sum), found once by
// comparing the two on values whose sum depends on the order, at lengths that reach every case of that
// order up to torch's grain (longer sums split over threads); 0 where no width matches - the
// products are then written out and summed by torch, as everywhere before.
int sum_width() {
    static const int width = [] {
        const int64_t lens[] = {1,    7,    8,    9,    15,   16,   17,   31,   32,   33,    63,    64,   65,
                                 127,  128,  129,  255,  256,  257,  511,  512,  513,  1000,  1023,  1024, 1025,
                                 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193, 16385, 20000, 32767};
        std::vector<float> v(32767);
        uint64_t u = 0x9E3779B97F4A7C15ull;
        for (float& f : v) {   // signs and magnitudes over 2^-12 .. 2^12: the sum's order shows
            u = u * 6364136223846793005ull + 1442695040888963407ull;
            const float m = (float)((u >> 40) & 0xFFFFFF) / 16777216.0f;
            f = ldexpf((u >> 39) & 1 ? -m : m, (int)((u >> 32) % 25) - 12);
        }
        for (int w : {8, 16, 4, 32}) {
            bool ok = true;
            for (int64_t n : lens) {
                const float ref = at::sum(at::from_blob(v.data(), {n}, at::kFloat)).item<float>();
                const float got = bfq_sum_ordered(v.data(), n, w);
                if (n >= w && memcmp(&ref, &got, sizeof ref) != 0) {
                    ok = false;
                    break;
                }
            }
            if (ok) return w;
        }
        return 0;
    }();
    return width;
}

// Whether a pass may sum n of its values itself (bfq_backward_sums) and have torch's sum of them: a
// width found, n at least one vector, and torch's sum of n values on one thread (up to its grain of
// 32768 values - above it torch splits a sum over its threads, tested - or one thread set).
bool sums_fit(int64_t n) {
    const int w = sum_width();
    return w > 0 && n >= w && (n <= 32768 || at::get_num_threads() == 1);
}

// kernel_backward and an integer quantizer's scale gradient: the difference of the products' sums -
// summed inside the pass where the scale is one value and the sums fit (sums_fit), else by torch.
void grads_kernel(const Tensor& x, const Tensor& g, const Tensor& s, const Layout& lay, double lo, double hi,
                  bool relu, int mask, bool need_x, bool need_s, Tensor& grad_x, Tensor& grad_s) {
    if (need_s && scalar_f32(s) && !lay.per_row && sums_fit(x.numel())) {
        grad_x = need_x ? at::empty_like(x) : Tensor();
        float r[2];
        bfq_backward_sums(x.data_ptr<float>(), g.data_ptr<float>(), x.numel(), fval(s), (float)lo, (float)hi, relu,
                          mask, sum_width(), fptr(grad_x), r);
        grad_s = scalar_of(r[0] - r[1], s);
        return;
    }
    const Products o = kernel_backward(x, g, s, lay, lo, hi, relu, mask, need_x, need_s);
    grad_x = o.gx;
    if (!need_s) return;
    if (scalar_f32(s))   // sum_to a 0-dim shape is sum(); the difference of two floats in float
        grad_s = scalar_of(fval(o.p1.sum()) - fval(o.p2.sum()), s);
    else
        grad_s = at::sum_to(o.p1, s.sizes()) - at::sum_to(o.p2, s.sizes());
}

// The tensor operations of a quantizer (where the passes do not take the tensors): r = relu?(x),
// y = r / d, q = round(y), c = clamp(q, lo, hi) - bounds numbers or tensors.
struct Quantized {
    Tensor r, y, q, c;
};

template <typename B>
Quantized quantize_ops(const Tensor& x, const Tensor& d, const B& lo, const B& hi, bool relu) {
    Quantized o;
    o.r = relu ? at::relu(x) : x;
    o.y = o.r / d;
    o.q = at::round(o.y);
    o.c = at::clamp(o.q, lo, hi);
    return o;
}

// fastquant._QuantFromValue: s = max(|value|, min_val) / thr; clamp(round(relu?(x) / s), lo, hi) * s.
struct QuantValue : public torch::autograd::Function<QuantValue> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& value, bool relu,
                          std::optional<double> min_val, const Tensor& thr, double lo, double hi, bool ste) {
        const Tensor s = scale_tensor(value, true, min_val, thr);
        const Layout lay = layout(x, s);
        ctx->saved_data["c"] = std::vector<double>{lo, hi, double(relu), double(ste), double(lay.ok)};
        if (lay.ok) {
            ctx->save_for_backward({x, s, value, thr});
            return kernel_forward(x, s, lay, lo, hi, relu);
        }
        const Quantized o = quantize_ops(x, s, lo, hi, relu);
        ctx->save_for_backward({o.y, s, o.c, o.q, value, thr, relu ? o.r : Tensor()});
        return o.c * s;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const Tensor& g = grads[0];
        const auto cfg = ctx->saved_data["c"].toDoubleVector();
        const double lo = cfg[0], hi = cfg[1];
        const bool relu = cfg[2] != 0.0, ste = cfg[3] != 0.0, kernel = cfg[4] != 0.0;
        const bool need_x = ctx->needs_input_grad(0), need_s = ctx->needs_input_grad(1);
        const auto saved = ctx->get_saved_variables();
        Tensor grad_x, grad_s, value, thr;
        if (kernel) {
            const Tensor &x = saved[0], &s = saved[1];
            value = saved[2];
            thr = saved[3];
            const int mask = ste ? 0 : (relu && lo <= 0 ? 1 : 2);   // after a ReLU nothing is below lo <= 0
            if (grad_fits(g, x)) {
                grads_kernel(x, g, s, layout(x, s), lo, hi, relu, mask, need_x, need_s, grad_x, grad_s);
            } else {   // a gradient in another layout: the operations, on the forward's values recomputed
                const Quantized o = quantize_ops(x, s, lo, hi, relu);
                grads_ops(g, o.y, s, o.c, o.q, mask != 0, lo, hi, mask == 1, need_x, need_s, grad_x, grad_s);
                if (grad_x.defined() && relu) grad_x = at::threshold_backward(grad_x, o.r, 0);
            }
        } else {
            const Tensor &y = saved[0], &s = saved[1], &c = saved[2], &q = saved[3], &r = saved[6];
            value = saved[4];
            thr = saved[5];
            grads_ops(g, y, s, c, q, !ste, lo, hi, relu && lo <= 0, need_x, need_s, grad_x, grad_s);
            if (grad_x.defined() && relu) grad_x = at::threshold_backward(grad_x, r, 0);
        }
        Tensor grad_v;   // div, the clamp straight-through, abs
        if (grad_s.defined() && scalar_f32(grad_s) && scalar_f32(thr) && scalar_f32(value))
            grad_v = scalar_of((fval(grad_s) / fval(thr)) * sgn_of_f(fval(value)), value);
        else if (grad_s.defined())
            grad_v = (grad_s / thr) * value.sgn();
        return {grad_x, grad_v, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// fastquant._QuantFromAbsMax: s = max(max|w|, min_val) / thr per tensor or per output channel; the
// statistic's gradient to each channel's arg-max, or spread over the ties of the tensor's maximum.
// absmax_forward / absmax_backward: the node's halves with what the backward reads passed explicitly (also
// the weight's part of QuantLinear).
struct AbsMaxSaved {
    std::vector<Tensor> t;    // kernel: w, s, at_max, thr; else y, s, c, q, w, at_max, thr
    std::vector<double> c;    // lo, hi, per_channel, ste, kernel, first
};

Tensor absmax_forward(const Tensor& w, bool per_channel, const std::vector<int64_t>& stats_shape,
                      std::optional<double> min_val, const Tensor& thr, double lo, double hi, bool ste, AbsMaxSaved& keep) {
    Tensor stats, at_max;
    float mx = 0.0f;
    int64_t ties = 0, first = -1;   // first: the unique arg-max (bfq_absmax), or -1
    if (!per_channel && w.scalar_type() == at::kFloat && w.device().is_cpu() && standard(w) && w.numel() > 0 &&
        bfq_absmax(w.data_ptr<float>(), w.numel(), &mx, &ties, &first) == 0) {
        stats = scalar_of(mx, w);   // torch.max(torch.abs(w)) in one pass (a 0-dim tensor, as torch's)
        at_max = stats;
        if (ties != 1) first = -1;
    } else if (per_channel) {
        auto mx = at::max(at::abs(w.reshape({w.size(0), -1})), 1);
        stats = std::get<0>(mx);
        at_max = std::get<1>(mx);
    } else {
        stats = at::max(at::abs(w.reshape(-1)));
        at_max = stats;
    }
    const Tensor s = scale_tensor(stats.view(stats_shape), false, min_val, thr);
    const Layout lay = layout(w, s);
    keep.c = {lo, hi, double(per_channel), double(ste), double(lay.ok), double(first)};
    if (lay.ok) {
        keep.t = {w, s, at_max, thr};
        return kernel_forward(w, s, lay, lo, hi, false);
    }
    const Quantized o = quantize_ops(w, s, lo, hi, false);
    keep.t = {o.y, s, o.c, o.q, w, at_max, thr};
    return o.c * s;
}

Tensor absmax_backward(const Tensor& g, const std::vector<Tensor>& saved, const std::vector<double>& cfg) {
    const double lo = cfg[0], hi = cfg[1];
    const bool per_channel = cfg[2] != 0.0, ste = cfg[3] != 0.0, kernel = cfg[4] != 0.0;
    const int64_t first = (int64_t)cfg[5];
    Tensor grad_x, grad_s, w, at_max, thr;
    if (kernel) {
        const Tensor& s = saved[1];
        w = saved[0];
        at_max = saved[2];
        thr = saved[3];
        if (grad_fits(g, w)) {
            grads_kernel(w, g, s, layout(w, s), lo, hi, false, ste ? 0 : 2, true, true, grad_x, grad_s);
        } else {
            const Quantized o = quantize_ops(w, s, lo, hi, false);
            grads_ops(g, o.y, s, o.c, o.q, !ste, lo, hi, false, true, true, grad_x, grad_s);
        }
    } else {
        grads_ops(g, saved[0], saved[1], saved[2], saved[3], !ste, lo, hi, false, true, true, grad_x, grad_s);
        w = saved[4];
        at_max = saved[5];
        thr = saved[6];
    }
    // div; the clamp is straight-through; then the view
    const Tensor grad_stats = scalar_f32(grad_s) && scalar_f32(thr) ? scalar_of(fval(grad_s) / fval(thr), grad_s)
                                                                    : grad_s / thr;
    const int64_t rows = w.size(0);
    if (kernel && standard(grad_x) && grad_x.scalar_type() == at::kFloat && grad_stats.scalar_type() == at::kFloat &&
        grad_x.sizes() == w.sizes() && grad_x.device().is_cpu()) {   // w: taken by the kernels
        if (per_channel) {
            const Tensor at = at_max.contiguous(), gs = grad_stats.reshape(-1).contiguous();
            bfq_add_at_rows(grad_x.data_ptr<float>(), w.data_ptr<float>(), rows, w.numel() / rows,
                            at.data_ptr<int64_t>(), gs.data_ptr<float>());
        } else if (first >= 0) {   // one element at the maximum: bfq_add_ties' sum with ties = 1, at it
            float* gx = grad_x.data_ptr<float>();
            const float share = grad_stats.reshape({}).item<float>() / 1.0f;
            gx[first] = gx[first] + share * 1.0f * sgn_of(w.data_ptr<float>()[first]);
        } else {
            bfq_add_ties(grad_x.data_ptr<float>(), w.data_ptr<float>(), w.numel(), at_max.item<float>(),
                         grad_stats.reshape({}).item<float>());
        }
    } else if (per_channel) {   // to the index torch.max returned, in each channel (autograd's scatter)
        using at::indexing::TensorIndex;
        const Tensor idx_rows = at::arange(rows, w.options().dtype(at::kLong));
        Tensor gw = grad_x.reshape({rows, -1});   // grad_x may be in another layout than w
        const Tensor wf = w.reshape({rows, -1});
        const std::vector<TensorIndex> idx{TensorIndex(idx_rows), TensorIndex(at_max)};
        Tensor part = gw.index(idx);
        part += grad_stats.reshape(-1) * wf.index(idx).sgn();
        gw.index_put_(idx, part);
        grad_x = gw.reshape(w.sizes());
    } else {   // spread evenly over the elements equal to the maximum (autograd's masked fill)
        const Tensor ties = at::rsub(at::threshold_backward(at::ones_like(w), at_max - at::abs(w), 0), 1.0);
        const Tensor share = grad_stats.reshape({}) / ties.sum();
        grad_x = grad_x.addcmul(ties, w.sgn(), share.item());
    }
    return grad_x;
}

struct QuantAbsMax : public torch::autograd::Function<QuantAbsMax> {
    static Tensor forward(AutogradContext* ctx, const Tensor& w, bool per_channel, std::vector<int64_t> stats_shape,
                          std::optional<double> min_val, const Tensor& thr, double lo, double hi, bool ste) {
        AbsMaxSaved keep;
        const Tensor out = absmax_forward(w, per_channel, stats_shape, min_val, thr, lo, hi, ste, keep);
        ctx->saved_data["c"] = keep.c;
        ctx->save_for_backward(keep.t);
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        variable_list out(8);
        if (!ctx->needs_input_grad(0)) return out;
        out[0] = absmax_backward(grads[0], ctx->get_saved_variables(), ctx->saved_data["c"].toDoubleVector());
        return out;
    }
};

// What QuantTensorRange's forward decided and the bounds it read, for its backward.
struct RangeConfig {
    bool relu, ste, none_below, kernel;
    double lo, hi;
};

// QuantTensorRange's backward on its saved tensors (kernel: x, s, lo, hi; else y, s, c, q, lo, hi, r): the
// gradients of x, s, lo and hi, each undefined where not needed.
variable_list range_grads(const Tensor& g, const variable_list& saved, const RangeConfig& cfg, bool need_x, bool need_s,
                          bool need_lo, bool need_hi) {
    const bool relu = cfg.relu, ste = cfg.ste, none_below = cfg.none_below, kernel = cfg.kernel;
    variable_list out(4);
    Tensor y, s, c, q, lo, hi, r;
    if (kernel) {
        const Tensor& x = saved[0];
        s = saved[1];
        lo = saved[2];
        hi = saved[3];
        if (grad_fits(g, x)) {
            const Layout lay = layout(x, s);
            const float lof = (float)cfg.lo, hif = (float)cfg.hi;
            Tensor grad_s;
            if (ste) {
                grads_kernel(x, g, s, lay, cfg.lo, cfg.hi, relu, 0, need_x, need_s, out[0], grad_s);
                out[1] = grad_s;
                return out;
            }
            // one scale and one pair of bounds: the four products summed inside the pass (sums_fit)
            if (scalar_f32(s) && lo.numel() == 1 && hi.numel() == 1 && lo.scalar_type() == at::kFloat &&
                hi.scalar_type() == at::kFloat && !lay.per_row && sums_fit(x.numel())) {
                Tensor gx = need_x ? at::empty_like(x) : Tensor();
                float r[4];
                bfq_backward_range_sums(x.data_ptr<float>(), g.data_ptr<float>(), x.numel(), fval(s), lof, hif, relu,
                                        sum_width(), fptr(gx), r);
                if (need_x) out[0] = gx;
                if (need_s) out[1] = scalar_of(r[0] - r[1], s);
                if (need_lo) out[2] = none_below ? at::zeros_like(lo) : scalar_of(r[3], lo).reshape(lo.sizes());
                if (need_hi) out[3] = scalar_of(r[2], hi).reshape(hi.sizes());
                return out;
            }
            // only the gradients needed (none of ``below`` where nothing can be below lo)
            const bool want_lo = need_lo && !none_below;
            const auto alloc = [&](bool want) { return want ? at::empty_like(x) : Tensor(); };
            Tensor gx = alloc(need_x), p1 = alloc(need_s), p2 = alloc(need_s), above = alloc(need_hi),
                   below = alloc(want_lo);
            const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>(), *sp = s.data_ptr<float>();
            float* o[5] = {fptr(gx), fptr(p1), fptr(p2), fptr(above), fptr(below)};
            split(lay, [&](int64_t row, int64_t rows, int64_t off, int64_t len) {
                const auto at_off = [&](float* p) { return p ? p + off : nullptr; };
                bfq_backward_range(xp + off, gp + off, rows, len, sp + (lay.per_row ? row : 0), lay.per_row, lof,
                                   hif, relu, at_off(o[0]), at_off(o[1]), at_off(o[2]), at_off(o[3]), at_off(o[4]));
            });
            if (need_x) out[0] = gx;
            if (need_s) out[1] = at::sum_to(p1, s.sizes()) - at::sum_to(p2, s.sizes());
            if (need_lo) out[2] = none_below ? at::zeros_like(lo) : at::sum_to(below, lo.sizes());
            if (need_hi) out[3] = at::sum_to(above, hi.sizes());
            return out;
        }
        // a gradient in another layout: the operations below, on the forward's values recomputed
        const Quantized o = quantize_ops(x, s, lo, hi, relu);
        y = o.y;
        q = o.q;
        c = o.c;
        if (relu) r = o.r;
    } else {
        y = saved[0];
        s = saved[1];
        c = saved[2];
        q = saved[3];
        lo = saved[4];
        hi = saved[5];
        r = saved[6];
    }
    const Tensor g2 = g * s;
    Tensor grad_q;
    if (ste) {
        grad_q = g2;
    } else {
        // where(q > hi, g2, 0) and where(q < lo, g2, 0); g2 minus both is g2 inside the range, 0 outside
        const Tensor above = at::threshold_backward(g2, q - hi, 0);
        if (none_below) {   // where(q < lo, g2, 0) is all zeros: its sum is exactly 0
            grad_q = g2 - above;
            if (need_lo) out[2] = at::zeros_like(lo);
        } else {
            const Tensor below = at::threshold_backward(g2, lo - q, 0);
            grad_q = g2 - above - below;
            if (need_lo) out[2] = at::sum_to(below, lo.sizes());
        }
        if (need_hi) out[3] = at::sum_to(above, hi.sizes());
    }
    if (need_x) {
        out[0] = grad_q / s;
        if (relu) out[0] = at::threshold_backward(out[0], r, 0);
    }
    if (need_s) out[1] = at::sum_to(g * c, s.sizes()) - at::sum_to(grad_q * (y / s), s.sizes());
    return out;
}

// fastquant._QuantTensorRange: clamp(round(relu?(x) / s), lo, hi) * s with a scale and bounds that are tensors
// computed under autograd (a learned width's: AdaQAT); the bounds get the clamp's gradients (the parts of g * s
// cut above hi and below lo, summed to their shapes), none under a straight-through clamp.
struct QuantTensorRange : public torch::autograd::Function<QuantTensorRange> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& s, const Tensor& lo, const Tensor& hi,
                          bool relu, bool ste, bool unsigned_) {
        const bool none_below = relu && unsigned_;   // q >= 0 == lo: nothing is clamped from below
        const Layout lay = lo.numel() == 1 && hi.numel() == 1 ? layout(x, s) : Layout{false, 0, 0, 0};
        const double lof = lay.ok ? lo.item<double>() : 0.0, hif = lay.ok ? hi.item<double>() : 0.0;
        ctx->saved_data["c"] = std::vector<double>{double(relu), double(ste), double(none_below), double(lay.ok), lof, hif};
        if (lay.ok) {   // one pass; the backward recomputes from x
            ctx->save_for_backward({x, s, lo, hi});
            return kernel_forward(x, s, lay, lof, hif, relu);
        }
        const Quantized o = quantize_ops(x, s, lo, hi, relu);
        ctx->save_for_backward({o.y, s, o.c, o.q, lo, hi, relu ? o.r : Tensor()});
        return o.c * s;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto cfg = ctx->saved_data["c"].toDoubleVector();
        const RangeConfig rc{cfg[0] != 0.0, cfg[1] != 0.0, cfg[2] != 0.0, cfg[3] != 0.0, cfg[4], cfg[5]};
        variable_list out = range_grads(grads[0], ctx->get_saved_variables(), rc, ctx->needs_input_grad(0),
                                        ctx->needs_input_grad(1), ctx->needs_input_grad(2), ctx->needs_input_grad(3));
        out.resize(7);
        return out;
    }
};

// asq._ASQQuantStep: clamp(round(x / (s * beta)), n, p) * s - ASQ's activation step, beta one value per sample
// (its adapter's); the clamp cuts the gradient outside [n, p]; s gets both uses' gradients, beta its own.
// step_forward / step_backward: the node's two halves with what the backward reads passed explicitly (also the
// last part of the whole site's node, ASQSite).
struct StepSaved {
    std::vector<Tensor> t;   // kernel: x, d, s, beta; else y, d, q, c, s, beta
    bool kernel;
};

Tensor step_forward(const Tensor& x, const Tensor& s, const Tensor& beta, double n, double p, StepSaved& keep) {
    const Tensor d = s * beta;
    const Layout lay = s.numel() == 1 && scalar_f32(s) ? layout(x, d) : Layout{false, 0, 0, 0};
    keep.kernel = lay.ok;
    if (lay.ok) {   // one pass dividing by d (per sample) and multiplying by s; the backward recomputes from x
        keep.t = {x, d, s, beta};
        return kernel_forward(x, d, lay, n, p, false, s);
    }
    const Quantized o = quantize_ops(x, d, n, p, false);
    keep.t = {o.y, d, o.q, o.c, s, beta};
    return o.c * s;
}

// The gradients of x, s and beta (each undefined unless wanted).
variable_list step_backward(const Tensor& g, const std::vector<Tensor>& saved, bool kernel, double n, double p,
                            bool need_x, bool need_s, bool need_b) {
    variable_list out(3);
    Tensor y, d, q, c, s, beta;
    if (kernel) {
        const Tensor& x = saved[0];
        d = saved[1];
        s = saved[2];
        beta = saved[3];
        const Layout lay = layout(x, d);
        if (grad_fits(g, x) && lay.per_row && d.numel() == lay.rows && lay.inner >= sum_width() &&
            sums_fit(x.numel())) {   // the sums of p1 (to s) and of p2 per sample (to d) inside the pass
            Tensor gx = need_x ? at::empty_like(x) : Tensor();
            Tensor p2 = at::empty(d.sizes(), d.options());
            float p1;
            bfq_backward_rows_sums(x.data_ptr<float>(), g.data_ptr<float>(), lay.rows, lay.inner,
                                   d.contiguous().data_ptr<float>(), fval(s), (float)n, (float)p, 2, sum_width(),
                                   fptr(gx), &p1, p2.data_ptr<float>());
            out[0] = gx;
            const int64_t rows = d.numel();
            if (scalar_f32(s) && beta.scalar_type() == at::kFloat && beta.is_contiguous() && beta.sizes() == d.sizes() &&
                sums_fit(rows)) {   // the per-sample products below in float, their sum in torch's order
                const float *pp = p2.data_ptr<float>(), *bp = beta.data_ptr<float>();
                const float sv = fval(s);
                std::vector<float> prod(rows);
                Tensor gb = need_b ? at::empty(beta.sizes(), beta.options()) : Tensor();
                float* gbp = fptr(gb);
                for (int64_t i = 0; i < rows; i++) {   // grad_d = -p2; grad_d * beta; grad_d * s
                    const float gd = -pp[i];
                    prod[i] = gd * bp[i];
                    if (gbp) gbp[i] = gd * sv;
                }
                if (need_s) out[1] = scalar_of(p1 + bfq_sum_ordered(prod.data(), rows, sum_width()), s);
                out[2] = gb;
                return out;
            }
            const Tensor grad_d = -p2;
            if (need_s) out[1] = scalar_of(p1, s) + at::sum_to(grad_d * beta, s.sizes());
            if (need_b) out[2] = at::sum_to(grad_d * s, beta.sizes());
            return out;
        }
        if (grad_fits(g, x)) {
            const Products o = kernel_backward(x, g, d, lay, n, p, false, 2, need_x, true, s);
            out[0] = o.gx;
            const Tensor grad_d = -at::sum_to(o.p2, d.sizes());
            if (need_s) out[1] = at::sum_to(o.p1, s.sizes()) + at::sum_to(grad_d * beta, s.sizes());
            if (need_b) out[2] = at::sum_to(grad_d * s, beta.sizes());
            return out;
        }
        const Quantized o = quantize_ops(x, d, n, p, false);   // a gradient in another layout: the operations
        y = o.y;
        q = o.q;
        c = o.c;
    } else {
        y = saved[0];
        d = saved[1];
        q = saved[2];
        c = saved[3];
        s = saved[4];
        beta = saved[5];
    }
    Tensor grad_q = g * s;   // keep_in_range: the clamp's backward, read as (p + 1/2) - q > 0 and q - (n - 1/2) > 0
    grad_q = at::threshold_backward(grad_q, at::rsub(q, p + 0.5), 0);
    grad_q = at::threshold_backward(grad_q, at::sub(q, n - 0.5), 0);
    if (need_x) out[0] = grad_q / d;
    const Tensor grad_d = -at::sum_to(grad_q * (y / d), d.sizes());
    if (need_s) out[1] = at::sum_to(g * c, s.sizes()) + at::sum_to(grad_d * beta, s.sizes());
    if (need_b) out[2] = at::sum_to(grad_d * s, beta.sizes());
    return out;
}

struct ASQStep : public torch::autograd::Function<ASQStep> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& s, const Tensor& beta, double n, double p) {
        StepSaved keep;
        const Tensor out = step_forward(x, s, beta, n, p, keep);
        ctx->saved_data["c"] = std::vector<double>{n, p, double(keep.kernel)};
        ctx->save_for_backward(keep.t);
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto cfg = ctx->saved_data["c"].toDoubleVector();
        variable_list out = step_backward(grads[0], ctx->get_saved_variables(), cfg[2] != 0.0, cfg[0], cfg[1],
                                          ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2));
        out.resize(5);
        return out;
    }
};

// asq.ASQAct's adapter statistics: (mean |x|, std) of each row of a 2-d float32 CPU tensor, one pass for the
// sums and one for the squared deviations (bfq_row_stats); the backward one pass (bfq_row_stats_backward)
// where autograd would run the abs, mean, stack and std backwards, each a pass and an allocation.
// stats_forward / stats_backward: the node's halves (also parts of ASQSite); x contiguous, aux per row.
Tensor stats_forward(const Tensor& x, Tensor& aux) {
    const int64_t rows = x.size(0), n = x.size(1);
    Tensor out = at::empty({rows, 2}, x.options());
    aux = at::empty({rows, 2}, x.options());
    const float* xp = x.data_ptr<float>();
    float *op = out.data_ptr<float>(), *ap = aux.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
        bfq_row_stats(xp + b * n, e - b, n, op + 2 * b, ap + 2 * b);
    });
    return out;
}

Tensor stats_backward(const Tensor& grad, const Tensor& x, const Tensor& aux) {
    const Tensor g = grad.to(at::kFloat).contiguous();
    const int64_t rows = x.size(0), n = x.size(1);
    Tensor gx = at::empty_like(x);
    const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>(), *ap = aux.data_ptr<float>();
    float* gxp = gx.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, n)), [&](int64_t b, int64_t e) {
        bfq_row_stats_backward(xp + b * n, gp + 2 * b, ap + 2 * b, e - b, n, gxp + b * n);
    });
    return gx;
}

struct RowStats : public torch::autograd::Function<RowStats> {
    static Tensor forward(AutogradContext* ctx, const Tensor& flat) {
        TORCH_CHECK(flat.dim() == 2 && flat.scalar_type() == at::kFloat && flat.device().is_cpu(),
                    "row_stats takes a 2-d float32 CPU tensor");
        const Tensor x = flat.contiguous();
        Tensor aux;
        const Tensor out = stats_forward(x, aux);
        ctx->save_for_backward({x, aux});
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        if (!grads[0].defined()) return {Tensor()};
        return {stats_backward(grads[0], saved[0], saved[1])};
    }
};

// The forward's values and what its backward reads (the saved "f" vector).
struct LearnedValues {
    float s, lo, hi;
    bool learned;
    std::vector<double> f;
};

LearnedValues learned_values(float nv, float v, bool has_value, bool is_signed, bool narrow, double const_scale,
                             std::optional<double> min_val, double lo_b, double hi_b, double frozen) {
    const bool learned = frozen <= 0.0;
    float bw;
    if (learned) {
        const float lb = (float)lo_b, hb = (float)hi_b;
        const float nc = std::isnan(nv) ? nv : std::min(std::max(nv, lb), hb);
        bw = nc + (std::nearbyint(nc) - nc);
    } else {
        bw = (float)frozen;
    }
    const float e = is_signed ? bw - 1.0f : bw;
    const float p = std::pow(2.0f, e);
    float lo, hi, thr;
    if (is_signed) {
        lo = narrow ? -p + 1.0f : -p;
        hi = p - 1.0f;
        thr = narrow ? -(-p + 1.0f) : -(-p);
    } else {
        lo = 0.0f * bw;
        hi = narrow ? p - 2.0f : p - 1.0f;
        thr = hi;
    }
    const float t = std::fabs(std::fabs(thr));
    float c, a = 0.0f, sign = 1.0f;
    if (has_value) {
        a = std::fabs(v);
        const float b = std::fabs(a);
        if (min_val) {
            sign = a >= 0.0f ? 1.0f : -1.0f;
            const float m = (float)*min_val;
            c = sign * (std::isnan(b) ? b : std::max(b, m));
        } else {
            c = b;
        }
    } else {
        c = (float)const_scale;
        v = 0.0f;
    }
    return {c / t, lo, hi, learned,
            {nv, lo_b, hi_b, p, thr, t, c, a, sign, v, double(learned), double(has_value), double(bool(min_val)),
             double(is_signed)}};
}

// The backward's scalars: n's gradient (need_n, a learned width) from the scale's, hi's and lo's gradients, and the
// value's (need_v) from the scale's; each present or not, as autograd hands them to the node.
struct LearnedGrads {
    std::optional<float> n, v;
};

LearnedGrads learned_grads(const std::vector<double>& f, bool need_n, bool need_v, std::optional<float> gs,
                           std::optional<float> glo, std::optional<float> ghi) {
    static constexpr float kLn2 = 0.693147180559945309417f;   // (float)log(2.0), as Scalar(2).log() in float
    const float nv = f[0], lb = f[1], hb = f[2], p = f[3], thr = f[4], t = f[5], c = f[6], a = f[7], sign = f[8],
                v = f[9];
    const bool learned = f[10] != 0.0, has_value = f[11] != 0.0, has_min = f[12] != 0.0;
    LearnedGrads out;
    if (learned && need_n) {
        bool any = false;
        float gbw = 0.0f;
        if (gs) {   // s = c / T: T's gradient, through the two abs and the negations to P, then pow
            const float gt = -*gs * ((c / t) / t);
            const float gthr = (gt * sgn_of_f(std::fabs(thr))) * sgn_of_f(thr);
            gbw = gthr * (p * kLn2);
            any = true;
        }
        if (ghi) {   // hi = P - k
            const float part = *ghi * (p * kLn2);
            gbw = any ? gbw + part : part;
            any = true;
        }
        if (glo) {   // lo: 0 * bw (unsigned) or -P (+ 1) (signed: not used with a bound gradient)
            const float part = f[13] != 0.0 ? -*glo * (p * kLn2) : *glo * 0.0f;
            gbw = any ? gbw + part : part;
            any = true;
        }
        if (any) out.n = nv >= lb && nv <= hb ? gbw : 0.0f;
    }
    if (has_value && gs && need_v) {   // s = c / T, c from |(|value|)|
        const float gd = *gs / t;
        // with a minimum: the sign's product, then abs_binary_sign_grad's binary sign; then abs
        const float ga = has_min ? (a >= 0.0f ? 1.0f : -1.0f) * (gd * sign) : gd;
        out.v = ga * sgn_of_f(v);
    }
    return out;
}

std::optional<float> fopt(const Tensor& t) { return t.defined() ? std::optional<float>(fval(t)) : std::nullopt; }

// A learned width's integer range and scale (AdaQAT: fastquant.fused_learned), what Brevitas's modules compute
// from the width parameter n and, for an activation, the learned scale value, as one node: forward
//   bw = frozen, or clamp(n, lo_b, hi_b) + (round(.) - .)   (LearnedBitWidth, straight-through)
//   P = 2 ** (bw - 1) signed, 2 ** bw unsigned               (brevitas.function.ops.min_int / max_int)
//   lo = -P + 1 | -P (signed narrow | wide), 0 * bw (unsigned); hi = P - 1 | P - 2 (unsigned narrow)
//   thr = -lo (signed, IntScaling) or hi (unsigned); T = |(|thr|)|  (threshold restrictions)
//   s = c / T, c = the constant scale (weights) or sign * max(|(|value|)|, min_val) (ScalarSignedClampMinSte;
//       without a minimum |(|value|)|)
// and a backward of autograd's formulas for those operations (DivBackward0's -g * ((c / T) / T), PowBackward2's
// g * (P * log 2), the abs, negation and clamp masks), each in float as ATen computes it. The width's gradient
// is the sum of the threshold's, hi's and lo's parts; the caller uses this node only where at most two of them
// are non-zero (a sum of two is exact in any order): a weight's straight-through clamp (bounds without
// gradient) or an unsigned range (lo = 0 * bw). Outputs: (s, lo, hi), 0-dim float tensors.
struct LearnedScale : public torch::autograd::Function<LearnedScale> {
    static variable_list forward(AutogradContext* ctx, const Tensor& n, const Tensor& value, bool has_value,
                                 bool is_signed, bool narrow, double const_scale, std::optional<double> min_val,
                                 double lo_b, double hi_b, double frozen) {
        const LearnedValues lv = learned_values(fval(n), has_value ? fval(value) : 0.0f, has_value, is_signed, narrow,
                                                const_scale, min_val, lo_b, hi_b, frozen);
        ctx->saved_data["f"] = lv.f;
        Tensor so = scalar_of(lv.s, n), lot = scalar_of(lv.lo, n), hit = scalar_of(lv.hi, n);
        if (!lv.learned || !n.requires_grad()) ctx->mark_non_differentiable({lot, hit});
        return {so, lot, hit};
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const Tensor &gs = grads[0], &glo = grads[1], &ghi = grads[2];
        const LearnedGrads r = learned_grads(ctx->saved_data["f"].toDoubleVector(), ctx->needs_input_grad(0),
                                             ctx->needs_input_grad(1), fopt(gs), fopt(glo), fopt(ghi));
        const Tensor& like = gs.defined() ? gs : ghi.defined() ? ghi : glo;
        variable_list out(10);
        if (r.n) out[0] = scalar_of(*r.n, like);
        if (r.v) out[1] = scalar_of(*r.v, gs);
        return out;
    }
};

// The learned-width nodes read the width and the value as floats: one error for tensors of another kind.
void check_width(const char* op, const Tensor& n, const std::optional<Tensor>& value) {
    TORCH_CHECK(scalar_f32(n) && (!value || scalar_f32(*value)), "bitfold_q.", op,
                ": the width and the value must be 0-dim float32 CPU tensors");
}

std::vector<Tensor> learned_scale(const Tensor& n, const std::optional<Tensor>& value, bool is_signed, bool narrow,
                                  double const_scale, std::optional<double> min_val, double lo_b, double hi_b,
                                  double frozen) {
    check_width("learned_scale", n, value);
    // (no value: n stands in, not read - an undefined input has no device for autograd's checks)
    return LearnedScale::apply(n, value ? *value : n, value.has_value(), is_signed, narrow, const_scale, min_val, lo_b,
                               hi_b, frozen);
}

// learned_scale and quant_range as one node, for a tensor the passes take (CPU float32, row-major): the forward
// computes the scale and bounds in float and quantizes in one pass; the backward runs QuantTensorRange's and then
// LearnedScale's backward on its gradients as autograd hands them over between the two nodes - every gradient of
// the scale and bounds present, a zero where the range node gave none (autograd's zero-filling of a C++ node's
// missing gradients) - so the result is the two nodes' bit for bit, without one node, three 0-dim tensors and a
// Python-to-C++ call per quantizer and step.
struct QuantLearned : public torch::autograd::Function<QuantLearned> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& n, const Tensor& value, bool has_value,
                          bool is_signed, bool narrow, double const_scale, std::optional<double> min_val, double lo_b,
                          double hi_b, double frozen, bool relu, bool ste) {
        const LearnedValues lv = learned_values(fval(n), has_value ? fval(value) : 0.0f, has_value, is_signed, narrow,
                                                const_scale, min_val, lo_b, hi_b, frozen);
        const Tensor s = scalar_of(lv.s, x);
        const bool none_below = relu && !is_signed;   // q >= 0 == lo: nothing is clamped from below
        ctx->saved_data["f"] = lv.f;
        ctx->saved_data["c"] = std::vector<double>{double(relu), double(ste), double(none_below), lv.lo, lv.hi};
        ctx->save_for_backward({x, s});
        return kernel_forward(x, s, layout(x, s), lv.lo, lv.hi, relu);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto f = ctx->saved_data["f"].toDoubleVector();
        const auto cfg = ctx->saved_data["c"].toDoubleVector();
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &s = saved[1];
        const bool need_n = ctx->needs_input_grad(1), need_v = f[11] != 0.0 && ctx->needs_input_grad(2);
        // what requires a gradient between the two nodes: s when n or the value does; lo and hi when the width
        // is learned and n does (else learned_scale marks them non-differentiable)
        const bool need_s = need_n || need_v, need_b = f[10] != 0.0 && need_n;
        const RangeConfig rc{cfg[0] != 0.0, cfg[1] != 0.0, cfg[2] != 0.0, true, cfg[3], cfg[4]};
        const Tensor lo = scalar_of((float)cfg[3], x), hi = scalar_of((float)cfg[4], x);
        const variable_list g4 = range_grads(grads[0], {x, s, lo, hi}, rc, ctx->needs_input_grad(0), need_s, need_b, need_b);
        const auto zero_filled = [](const Tensor& t) { return std::optional<float>(t.defined() ? fval(t) : 0.0f); };
        variable_list out(13);
        out[0] = g4[0];
        if (need_s) {
            const LearnedGrads r = learned_grads(f, need_n, need_v, zero_filled(g4[1]), zero_filled(g4[2]),
                                                 zero_filled(g4[3]));
            if (r.n) out[1] = scalar_of(*r.n, x);
            if (r.v) out[2] = scalar_of(*r.v, x);
        }
        return out;
    }
};

// QuantLearned where the passes take x, else the two nodes.
Tensor quant_learned(const Tensor& x, const Tensor& n, const std::optional<Tensor>& value, bool is_signed, bool narrow,
                     double const_scale, std::optional<double> min_val, double lo_b, double hi_b, double frozen, bool relu,
                     bool ste_clamp) {
    check_width("quant_learned", n, value);
    if (layout(x, n).ok)   // (n: a 0-dim float32 CPU tensor, as the scale is)
        return QuantLearned::apply(x, n, value ? *value : n, value.has_value(), is_signed, narrow, const_scale, min_val,
                                   lo_b, hi_b, frozen, relu, ste_clamp);
    const std::vector<Tensor> r = learned_scale(n, value, is_signed, narrow, const_scale, min_val, lo_b, hi_b, frozen);
    return QuantTensorRange::apply(x, r[0], r[1], r[2], relu, ste_clamp, !is_signed);
}

// How ATen's tanh_backward computes a * (1 - t * t) on this machine: 1 with 1 - t * t as one fused multiply-add
// (its kernels compiled with contraction for a CPU with FMA), 0 with two roundings, -1 neither (then ATen's own
// call runs) - read once by comparing its results with both forms on values whose roundings tell them apart.
int tanh_backward_form() {
    static const int form = [] {
        const int64_t n = 4099;   // vector blocks and a scalar tail
        const Tensor t = at::tanh(at::linspace(-3.0, 3.0, n, at::kFloat) * 1.37);
        const Tensor a = at::sin(at::linspace(-50.0, 50.0, n, at::kFloat)) * 3.1;
        const Tensor ref = at::tanh_backward(a, t);
        Tensor mine = at::empty_like(t);
        for (int fused = 1; fused >= 0; fused--) {
            bfq_tanh_backward(a.data_ptr<float>(), t.data_ptr<float>(), n, fused, mine.data_ptr<float>());
            if (at::equal(mine, ref)) return fused;
        }
        return -1;
    }();
    return form;
}

// The normalisation's gradient at its one maximum: d's gradient (the sum of the products p, summed to 0-dim),
// through clamp_min's mask, shared over the one element.
float max_share_of(float gd, float mx, float mf) { return (mx >= mf ? gd : 0.0f) / 1.0f; }

float max_share(const Tensor& p, float mx, float mf) {
    return max_share_of(fval(at::sum_to(p, c10::IntArrayRef{})), mx, mf);
}

// adaqat.TanhNormalize: tanh(w) / max(max|tanh(w)|, min_val) - tanh and its backward by ATen, the maximum in
// one pass (bfq_absmax, with its unique arg-max), the rest of autograd's graph (DivBackward0 for both operands,
// clamp_min's mask, MaxBackward1's share to the maximum, AbsBackward0's sgn) in the passes of qkernels.c and one
// torch sum. Where the maximum is not unique or a value is NaN, or the tensors do not suit the passes: the
// operations themselves, under autograd (this node then only wraps them).
struct TanhNorm : public torch::autograd::Function<TanhNorm> {
    static Tensor forward(AutogradContext* ctx, const Tensor& w, double min_val) {
        const Tensor t = at::tanh(w);
        float mx = 0.0f;
        int64_t ties = 0, first = -1;
        const bool fast = t.scalar_type() == at::kFloat && t.device().is_cpu() && standard(t) && t.numel() > 0 &&
                          bfq_absmax(t.data_ptr<float>(), t.numel(), &mx, &ties, &first) == 0 && ties == 1;
        const float mf = (float)min_val;
        const float d = mx < mf ? mf : mx;   // clamp_min: max(m, min) in float
        ctx->saved_data["fast"] = fast;
        ctx->saved_data["f"] = std::vector<double>{d, mx, min_val, double(first)};
        ctx->save_for_backward({w, t});
        return fast ? t / scalar_of(d, t) : t / at::clamp_min(at::max(at::abs(t)), min_val);
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const Tensor& g = grads[0];
        const auto saved = ctx->get_saved_variables();
        const Tensor &w = saved[0], &t = saved[1];
        const auto f = ctx->saved_data["f"].toDoubleVector();
        if (!ctx->saved_data["fast"].toBool() || !(g.scalar_type() == at::kFloat && standard(g) && g.sizes() == t.sizes())) {
            // the operations' own graph, recomputed from w (tied maxima, NaN, other layouts)
            Tensor wv = w.detach().requires_grad_(true), out;
            {
                at::AutoGradMode on(true);
                const Tensor tv = at::tanh(wv);
                out = tv / at::clamp_min(at::max(at::abs(tv)), f[2]);
            }
            return {torch::autograd::grad({out}, {wv}, {g})[0], Tensor()};
        }
        const float d = f[0], mx = f[1], mf = f[2];
        const int64_t first = (int64_t)f[3], n = t.numel();
        const float *gp = g.data_ptr<float>(), *tp = t.data_ptr<float>();
        Tensor p = at::empty_like(t);
        bfq_tanhnorm_prods(gp, tp, n, d, p.data_ptr<float>());
        const float share = max_share(p, mx, mf);
        const int slope = tanh_backward_form();
        if (slope >= 0) {   // t's gradient and tanh's backward in one pass
            Tensor gw = at::empty_like(t);
            bfq_tanhnorm_grad_w(gp, tp, n, d, first, share, slope, gw.data_ptr<float>());
            return {gw, Tensor()};
        }
        Tensor gt = at::empty_like(t);
        bfq_tanhnorm_grad(gp, tp, n, d, first, share, gt.data_ptr<float>());
        return {at::tanh_backward(gt, t), Tensor()};
    }
};

Tensor tanh_normalize(const Tensor& w, double min_val) { return TanhNorm::apply(w, min_val); }

// tanh_normalize then quant_learned for an AdaQAT weight (a tanh-normalised weight, a constant scale, a straight-
// through clamp) as one node with one pass each way (bfq_tanhq_*): the normalised weight is neither written nor
// read back, and in the backward its gradient gx feeds the normalisation's products and tanh's slope in the same
// pass. Every expression is the two nodes' (the passes compute the same float operations element by element,
// the three sums are torch's on the same products, the width's gradient learned_grads' and the maximum's share
// TanhNorm's), so outputs and gradients are theirs bit for bit. t = tanh(w) and the maximum's index come in
// computed (tanh_learned checks the maximum is unique); a gradient in another layout recomputes the two nodes
// under autograd.
// TanhLearned's halves (also the weight's part of TanhLearnedLinear): the forward's settings (c), values (f) and
// quantized weight; the backward's gradients of w and n (undefined unless wanted).
struct TanhSaved {
    std::vector<double> f, c;
};

Tensor tanh_learned_forward(const Tensor& t, double mx, int64_t first, double min_val, bool is_signed, bool narrow,
                            double const_scale, double lo_b, double hi_b, double frozen, const Tensor& n, TanhSaved& keep) {
    const float mf = (float)min_val, mxf = (float)mx;
    const float d = mxf < mf ? mf : mxf;   // clamp_min: max(m, min) in float
    const LearnedValues lv = learned_values(fval(n), 0.0f, false, is_signed, narrow, const_scale, std::nullopt,
                                            lo_b, hi_b, frozen);
    keep.f = lv.f;
    keep.c = std::vector<double>{d, mxf, min_val, double(first), lv.s, lv.lo, lv.hi, double(is_signed),
                                 double(narrow), const_scale, lo_b, hi_b, frozen};
    Tensor out = at::empty_like(t);
    bfq_tanhq_forward(t.data_ptr<float>(), t.numel(), d, lv.s, lv.lo, lv.hi, out.data_ptr<float>());
    return out;
}

variable_list tanh_learned_backward(const Tensor& g, const Tensor& w, const Tensor& n, const Tensor& t,
                                    const std::vector<double>& f, const std::vector<double>& c, bool need_w, bool need_n) {
    variable_list out(2);
    if (!grad_fits(g, t)) {   // the two nodes under autograd, recomputed from w
        Tensor wv = w.detach().requires_grad_(true), nv = n.detach().requires_grad_(need_n), o;
        {
            at::AutoGradMode on(true);
            const Tensor x = TanhNorm::apply(wv, c[2]);
            o = QuantLearned::apply(x, nv, nv, false, c[7] != 0.0, c[8] != 0.0, c[9], std::nullopt, c[10], c[11],
                                    c[12], false, true);
        }
        std::vector<Tensor> inputs{wv};
        if (need_n) inputs.push_back(nv);
        const auto r = torch::autograd::grad({o}, inputs, {g}, std::nullopt, false, true);
        if (need_w) out[0] = r[0];
        if (need_n) out[1] = r[1];
        return out;
    }
    const float d = c[0], mx = c[1], mf = c[2], sv = c[4], lo = c[5], hi = c[6];
    const int64_t first = (int64_t)c[3], numel = t.numel();
    const int form = tanh_backward_form();   // >= 0: tanh_learned checked it
    const float *tp = t.data_ptr<float>(), *gp = g.data_ptr<float>();
    Tensor gw = at::empty_like(t);
    float r[3];   // the sums of p1, p2 (the scale's products) and p3 (the normalisation's)
    if (sums_fit(numel)) {   // summed inside the pass
        bfq_tanhq_backward_sums(tp, gp, numel, d, sv, lo, hi, need_n, form, sum_width(), gw.data_ptr<float>(), r);
    } else {   // written out and summed by torch
        Tensor p1 = need_n ? at::empty_like(t) : Tensor(), p2 = need_n ? at::empty_like(t) : Tensor();
        Tensor p3 = at::empty_like(t);
        bfq_tanhq_backward(tp, gp, numel, d, sv, lo, hi, need_n, form, fptr(p1), fptr(p2), p3.data_ptr<float>(),
                           gw.data_ptr<float>());
        r[0] = need_n ? fval(p1.sum()) : 0.0f;
        r[1] = need_n ? fval(p2.sum()) : 0.0f;
        r[2] = need_w ? fval(at::sum_to(p3, c10::IntArrayRef{})) : 0.0f;
    }
    if (need_w) {   // the maximum's share (TanhNorm's backward), at its one element
        const float share = max_share_of(r[2], mx, mf);
        const float gc = gp[first] * sv, gx = gc / sv;
        gw.data_ptr<float>()[first] = (gx / d + share * sgn_of(tp[first])) * tanh_slope(tp[first], form);
        out[0] = gw;
    }
    if (need_n) {   // the scale's gradient (sum of p1 - sum of p2, in float), then the width's
        const LearnedGrads lg = learned_grads(f, true, false, r[0] - r[1], 0.0f, 0.0f);
        if (lg.n) out[1] = scalar_of(*lg.n, n);
    }
    return out;
}

struct TanhLearned : public torch::autograd::Function<TanhLearned> {
    static Tensor forward(AutogradContext* ctx, const Tensor& w, const Tensor& n, const Tensor& t, double mx,
                          int64_t first, double min_val, bool is_signed, bool narrow, double const_scale, double lo_b,
                          double hi_b, double frozen) {
        TanhSaved keep;
        const Tensor out =
            tanh_learned_forward(t, mx, first, min_val, is_signed, narrow, const_scale, lo_b, hi_b, frozen, n, keep);
        ctx->saved_data["f"] = keep.f;
        ctx->saved_data["c"] = keep.c;
        ctx->save_for_backward({w, n, t});
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        variable_list out = tanh_learned_backward(grads[0], saved[0], saved[1], saved[2],
                                                  ctx->saved_data["f"].toDoubleVector(),
                                                  ctx->saved_data["c"].toDoubleVector(), ctx->needs_input_grad(0),
                                                  ctx->needs_input_grad(1));
        out.resize(12);
        return out;
    }
};

// TanhLearned and F.linear of a 2-d input as one node (AdaQAT's weights; QuantLinear's form): wq = TanhLearned's
// forward, then at::linear(x, wq, bias); the backward the product's formulas (mat1_grad, mat2_grad and the
// transpose's, the bias summed to its shape) and then TanhLearned's backward of the weight's gradient.
struct TanhLearnedLinear : public torch::autograd::Function<TanhLearnedLinear> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                          const Tensor& n, const Tensor& t, double mx, int64_t first, double min_val, bool is_signed,
                          bool narrow, double const_scale, double lo_b, double hi_b, double frozen) {
        TanhSaved keep;
        const Tensor wq =
            tanh_learned_forward(t, mx, first, min_val, is_signed, narrow, const_scale, lo_b, hi_b, frozen, n, keep);
        const Tensor b = bias.has_value() ? *bias : Tensor();
        const Tensor out = at::linear(x, wq, b);
        ctx->saved_data["f"] = keep.f;
        ctx->saved_data["c"] = keep.c;
        ctx->save_for_backward({x, wq, b, w, n, t});
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto v = ctx->get_saved_variables();
        const bool need_w = ctx->needs_input_grad(1), need_n = ctx->needs_input_grad(v[2].defined() ? 3 : 2);
        const LinearGrads lg = linear_grads(ctx, grads[0], v, need_w || need_n);
        variable_list out(14);
        out[0] = lg.x;
        out[2] = lg.b;
        if (need_w || need_n) {
            const variable_list r = tanh_learned_backward(lg.wq, v[3], v[4], v[5], ctx->saved_data["f"].toDoubleVector(),
                                                          ctx->saved_data["c"].toDoubleVector(), need_w, need_n);
            out[1] = r[0];
            out[3] = r[1];
        }
        return out;
    }
};

// Whether TanhLearned's pass applies to w (a row-major float32 CPU weight, a unique maximum of |tanh(w)|, tanh's
// backward in a known form): then t = tanh(w), its maximum and where it is.
bool tanh_pass(const Tensor& w, Tensor& t, float& mx, int64_t& first) {
    if (!(w.scalar_type() == at::kFloat && w.device().is_cpu() && standard(w) && w.numel() > 0 &&
          tanh_backward_form() >= 0))
        return false;
    {
        at::NoGradGuard no_grad;
        t = at::tanh(w);
    }
    int64_t ties = 0;
    return standard(t) && bfq_absmax(t.data_ptr<float>(), t.numel(), &mx, &ties, &first) == 0 && ties == 1;
}

// TanhLearned where its pass applies, else tanh_normalize then quant_learned.
Tensor tanh_learned(const Tensor& w, const Tensor& n, double min_val, bool is_signed, bool narrow, double const_scale,
                    double lo_b, double hi_b, double frozen) {
    check_width("tanh_learned", n, std::nullopt);
    Tensor t;
    float mx = 0.0f;
    int64_t first = -1;
    if (tanh_pass(w, t, mx, first))
        return TanhLearned::apply(w, n, t, mx, first, min_val, is_signed, narrow, const_scale, lo_b, hi_b, frozen);
    return quant_learned(TanhNorm::apply(w, min_val), n, std::nullopt, is_signed, narrow, const_scale, std::nullopt,
                         lo_b, hi_b, frozen, false, true);
}

// TanhLearnedLinear where TanhLearned's pass applies and x is 2-d, else F.linear of tanh_learned's weight.
Tensor tanh_learned_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const Tensor& n,
                           double min_val, bool is_signed, bool narrow, double const_scale, double lo_b, double hi_b,
                           double frozen) {
    check_width("tanh_learned_linear", n, std::nullopt);
    Tensor t;
    float mx = 0.0f;
    int64_t first = -1;
    if (x.dim() == 2 && w.dim() == 2 && tanh_pass(w, t, mx, first))
        return TanhLearnedLinear::apply(x, w, bias, n, t, mx, first, min_val, is_signed, narrow, const_scale, lo_b,
                                        hi_b, frozen);
    return at::linear(x, tanh_learned(w, n, min_val, is_signed, narrow, const_scale, lo_b, hi_b, frozen),
                      bias.has_value() ? *bias : Tensor());
}

// asq.POSTWeight's snap: levels = alpha * unit_levels, then levels[i] + (w - w.detach()), i the nearest level of
// each weight (assign: the number of midpoints of the ascending levels strictly below it); w's gradient passes
// through, the levels' is the gather's backward (index_put_ with accumulate) and alpha's MulBackward0's (the
// levels' gradient times unit_levels, summed to alpha's shape) - the product and its gradient in the node, one
// autograd node less a weight. The passes of qkernels.c where the levels are ascending and the tensors suit
// them, else ATen's operations (assign's sort, bucketize, index).
struct PostSnap : public torch::autograd::Function<PostSnap> {
    static Tensor forward(AutogradContext* ctx, const Tensor& w, const Tensor& alpha, const Tensor& unit) {
        const Tensor lv = at::mul(alpha, unit).detach();
        ctx->saved_data["k"] = lv.numel();
        if (w.scalar_type() == at::kFloat && lv.scalar_type() == at::kFloat && w.device().is_cpu() &&
            lv.device().is_cpu() && standard(w) && lv.dim() == 1 && lv.is_contiguous() && lv.numel() <= 65535) {
            Tensor out = at::empty_like(w);
            Tensor idx = at::empty(w.sizes(), w.options().dtype(at::kShort));   // uint16 values in int16 storage
            const int rc = bfq_snap_levels(w.data_ptr<float>(), w.numel(), lv.data_ptr<float>(), lv.numel(),
                                           out.data_ptr<float>(), reinterpret_cast<uint16_t*>(idx.data_ptr<int16_t>()));
            if (rc == 0) {
                ctx->save_for_backward({alpha, unit, idx});
                ctx->saved_data["fast"] = true;
                return out;
            }
        }
        const bool sorted = lv.numel() < 2 || at::ge(lv.slice(0, 1), lv.slice(0, 0, -1)).all().item<bool>();
        const Tensor c = sorted ? lv : std::get<0>(at::sort(lv));
        const Tensor mids = (c.slice(0, 1) + c.slice(0, 0, -1)) / 2;
        const Tensor idx = at::bucketize(w.detach(), mids);
        ctx->save_for_backward({alpha, unit, idx});
        ctx->saved_data["fast"] = false;
        return lv.index({idx}) + (w - w.detach());
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const Tensor& g = grads[0];
        const auto saved = ctx->get_saved_variables();
        const Tensor &alpha = saved[0], &unit = saved[1], &idx = saved[2];
        const int64_t k = ctx->saved_data["k"].toInt();
        Tensor grad_alpha;
        if (ctx->needs_input_grad(1)) {
            Tensor grad_lv = at::zeros({k}, g.options());
            if (ctx->saved_data["fast"].toBool() && g.scalar_type() == at::kFloat && standard(g) &&
                g.sizes() == idx.sizes()) {
                bfq_scatter_add(g.data_ptr<float>(), reinterpret_cast<const uint16_t*>(idx.data_ptr<int16_t>()),
                                g.numel(), grad_lv.data_ptr<float>());
            } else {
                const Tensor i64 =
                    ctx->saved_data["fast"].toBool() ? at::bitwise_and(idx.to(at::kInt), 0xffff).to(at::kLong) : idx;
                grad_lv.index_put_({i64}, g, true);
            }
            grad_alpha = at::sum_to(at::mul(grad_lv, unit), alpha.sizes());
        }
        return {g, grad_alpha, Tensor()};
    }
};

Tensor post_snap(const Tensor& w, const Tensor& alpha, const Tensor& unit_levels) {
    return PostSnap::apply(w, alpha, unit_levels);
}


// fastquant's fused max-abs weight quantizer and F.linear of a 2-d input as one node: wq = QuantAbsMax's forward,
// then at::linear(x, wq, bias) (an addmm with the bias, else an mm); the backward autograd's formulas for that
// product (AddmmBackward0 / MmBackward0: mat1_grad, mat2_grad and the transpose's, the bias's gradient summed to
// its shape) and then QuantAbsMax's backward of the weight's gradient - the same ATen products and passes, bit
// for bit, as one node and one operator call where there were three nodes and two calls.
struct QuantLinear : public torch::autograd::Function<QuantLinear> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                          bool per_channel, std::vector<int64_t> stats_shape, std::optional<double> min_val,
                          const Tensor& thr, double lo, double hi, bool ste) {
        AbsMaxSaved keep;
        const Tensor wq = absmax_forward(w, per_channel, stats_shape, min_val, thr, lo, hi, ste, keep);
        const Tensor b = bias.has_value() ? *bias : Tensor();
        const Tensor out = at::linear(x, wq, b);
        ctx->saved_data["c"] = keep.c;
        std::vector<Tensor> saved{x, wq, b};
        saved.insert(saved.end(), keep.t.begin(), keep.t.end());
        ctx->save_for_backward(saved);
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto v = ctx->get_saved_variables();
        const LinearGrads lg = linear_grads(ctx, grads[0], v, ctx->needs_input_grad(1));
        variable_list out(10);
        out[0] = lg.x;
        out[2] = lg.b;
        if (lg.wq.defined())
            out[1] = absmax_backward(lg.wq, std::vector<Tensor>(v.begin() + 3, v.end()), ctx->saved_data["c"].toDoubleVector());
        return out;
    }
};

// asq.ASQAct's adapter as one node: beta = 2 * sigmoid(linear(relu(linear(stats, w1, b1)), w2, b2)) - the ATen
// calls F.linear makes (addmm of the bias, the input and the weight's transpose), relu, sigmoid and the product
// by 2 - and in the backward autograd's formulas for each (MulBackward1, SigmoidBackward0, AddmmBackward0 with
// the bias's gradient summed to its shape, TBackward0, ReluBackward0), the same ATen calls on the same tensors,
// so beta and every gradient are the operations' bit for bit, without ~12 autograd nodes and ~6 Python calls.
// adapter_forward / adapter_backward: the node's halves (also part of ASQSite); a = {stats, w1, b1, w2, b2, h, y}.
Tensor adapter_forward(const Tensor& stats, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2,
                       Tensor& h, Tensor& y) {
    h = at::relu(at::addmm(b1, stats, w1.t()));
    y = at::sigmoid(at::addmm(b2, h, w2.t()));
    return at::mul(y, 2);
}

// The gradients of stats, w1, b1, w2, b2 where need[i].
variable_list adapter_backward(const Tensor& grad, const std::vector<Tensor>& a, const bool need[5]) {
    const Tensor &stats = a[0], &w1 = a[1], &b1 = a[2], &w2 = a[3], &b2 = a[4], &h = a[5], &y = a[6];
    const Tensor go = at::sigmoid_backward(at::mul(grad, 2), y);
    variable_list out(5);
    if (need[4]) out[4] = at::sum_to(go, b2.sizes());
    if (need[3]) out[3] = mat2_grad(go, h, w2.t()).t();
    if (!(need[0] || need[1] || need[2])) return out;
    const Tensor gh = at::threshold_backward(mat1_grad(go, w2.t(), h), h, 0);
    if (need[2]) out[2] = at::sum_to(gh, b1.sizes());
    if (need[1]) out[1] = mat2_grad(gh, stats, w1.t()).t();
    if (need[0]) out[0] = mat1_grad(gh, w1.t(), stats);
    return out;
}

struct ASQAdapter : public torch::autograd::Function<ASQAdapter> {
    static Tensor forward(AutogradContext* ctx, const Tensor& stats, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                          const Tensor& b2) {
        Tensor h, y;
        const Tensor beta = adapter_forward(stats, w1, b1, w2, b2, h, y);
        ctx->save_for_backward({stats, w1, b1, w2, b2, h, y});
        return beta;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        bool need[5];
        for (int i = 0; i < 5; i++) need[i] = ctx->needs_input_grad(i);
        return adapter_backward(grads[0], ctx->get_saved_variables(), need);
    }
};

// asq.ASQAct's whole training step as one node: s = exp(log_s), the statistics of x's rows, the adapter's beta
// (viewed as one value per sample), the activation step - RowStats, ASQAdapter and ASQStep's halves, and
// ExpBackward0's grad * result for log_s; x's gradient is the step's plus the statistics' (the two uses autograd
// would add). The same values and gradients as those nodes, bit for bit, as one node and one call.
struct ASQSite : public torch::autograd::Function<ASQSite> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& log_s, const Tensor& w1,
                          const Tensor& b1, const Tensor& w2, const Tensor& b2, double n, double p) {
        const Tensor s = at::exp(log_s);
        const Tensor flat = x.reshape({x.size(0), -1}).contiguous();
        Tensor aux, h, y;
        const Tensor stats = stats_forward(flat, aux);
        std::vector<int64_t> bshape(x.dim(), 1);
        bshape[0] = x.size(0);
        const Tensor beta = adapter_forward(stats, w1, b1, w2, b2, h, y).view(bshape);
        StepSaved keep;
        const Tensor out = step_forward(x, s, beta, n, p, keep);
        std::vector<Tensor> saved{flat, aux, stats, w1, b1, w2, b2, h, y, s};
        saved.insert(saved.end(), keep.t.begin(), keep.t.end());
        ctx->save_for_backward(saved);
        ctx->saved_data["c"] = std::vector<double>{n, p, double(keep.kernel)};
        return out;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        const auto cfg = ctx->saved_data["c"].toDoubleVector();
        const auto v = ctx->get_saved_variables();
        const Tensor &flat = v[0], &aux = v[1], &s = v[9];
        bool need[5] = {ctx->needs_input_grad(0), ctx->needs_input_grad(2), ctx->needs_input_grad(3),
                        ctx->needs_input_grad(4), ctx->needs_input_grad(5)};   // stats (x), w1, b1, w2, b2
        const bool need_b = need[0] || need[1] || need[2] || need[3] || need[4];
        const variable_list st = step_backward(grads[0], std::vector<Tensor>(v.begin() + 10, v.end()), cfg[2] != 0.0,
                                               cfg[0], cfg[1], need[0], ctx->needs_input_grad(1), need_b);
        variable_list out(8);
        if (st[1].defined()) out[1] = at::mul(st[1], s);   // ExpBackward0: grad * result
        if (!need_b) return out;   // (then x needs no gradient either)
        const std::vector<Tensor> a(v.begin() + 2, v.begin() + 9);   // stats, w1, b1, w2, b2, h, y
        const variable_list ga = adapter_backward(st[2].reshape({flat.size(0), 1}), a, need);
        for (int i = 1; i < 5; i++) out[i + 1] = ga[i];
        if (need[0]) {   // the engine adds the second gradient to the first (the step's, fresh) in place
            Tensor gx = st[0];
            out[0] = gx.add_(stats_backward(ga[0], flat, aux).view(gx.sizes()));
        }
        return out;
    }
};

Tensor asq_adapter(const Tensor& stats, const Tensor& w1, const Tensor& b1, const Tensor& w2, const Tensor& b2) {
    return ASQAdapter::apply(stats, w1, b1, w2, b2);
}

Tensor row_stats(const Tensor& flat) { return RowStats::apply(flat); }

Tensor asq_site(const Tensor& x, const Tensor& log_s, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                const Tensor& b2, double n, double p) {
    TORCH_CHECK(x.dim() >= 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
                "asq_site takes a float32 CPU tensor of at least 2 dimensions");
    return ASQSite::apply(x, log_s, w1, b1, w2, b2, n, p);
}

Tensor asq_step(const Tensor& x, const Tensor& s, const Tensor& beta, double n, double p) {
    return ASQStep::apply(x, s, beta, n, p);
}

Tensor quant_range(const Tensor& x, const Tensor& s, const Tensor& lo, const Tensor& hi, bool relu, bool ste_clamp,
                   bool unsigned_) {
    return QuantTensorRange::apply(x, s, lo, hi, relu, ste_clamp, unsigned_);
}

Tensor quant_value(const Tensor& x, const Tensor& value, bool relu, std::optional<double> min_val, const Tensor& thr,
                   double lo, double hi, bool ste_clamp) {
    return QuantValue::apply(x, value, relu, min_val, thr, lo, hi, ste_clamp);
}

Tensor quant_linear(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, bool per_channel,
                    at::IntArrayRef stats_shape, std::optional<double> min_val, const Tensor& thr, double lo, double hi,
                    bool ste_clamp) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "quant_linear takes a 2-d input and weight");
    return QuantLinear::apply(x, w, bias, per_channel, stats_shape.vec(), min_val, thr, lo, hi, ste_clamp);
}

Tensor quant_absmax(const Tensor& w, bool per_channel, at::IntArrayRef stats_shape, std::optional<double> min_val,
                    const Tensor& thr, double lo, double hi, bool ste_clamp) {
    return QuantAbsMax::apply(w, per_channel, stats_shape.vec(), min_val, thr, lo, hi, ste_clamp);
}

// AdaQAT's product-form penalty (adaqat.ProductCost): sum_l coef_l * b_w[l] (* b_a[l]) over the widths clamped to
// their bounds, ns = the layers' weight widths then (acts) their sites' widths, each once. The same ATen calls as
// the Python Function (stack, clamp, the two products, sum; backward: SumBackward's expand, MulBackward0's
// g * other, ClampBackward1's where), made from C++.
struct ProductCostNode : public torch::autograd::Function<ProductCostNode> {
    // AdaQAT's widths and settings as they always are (0-dim float32 widths, float32 vectors, no NaN): the
    // element-wise operations on the values here, in float (each an exactly rounded product or comparison, as
    // ATen's), and only the sum as ATen's on the same k products - the same results without ~10 dispatches a
    // step forward and backward.
    static bool scalar_form(const Tensor& coef, const Tensor& lo, const Tensor& hi, const at::TensorList& ns) {
        const auto vec = [&](const Tensor& t) {
            return t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 1 && t.is_contiguous() &&
                   t.size(0) == (int64_t)ns.size();
        };
        if (!(coef.scalar_type() == at::kFloat && coef.device().is_cpu() && coef.dim() == 1 && coef.is_contiguous() &&
              vec(lo) && vec(hi)))
            return false;
        const float *l = lo.data_ptr<float>(), *h = hi.data_ptr<float>();
        for (size_t i = 0; i < ns.size(); i++) {
            if (!scalar_f32(ns[i])) return false;
            const float v = fval(ns[i]);
            if (std::isnan(v) || std::isnan(l[i]) || std::isnan(h[i])) return false;
        }
        return true;
    }

    static Tensor forward(AutogradContext* ctx, const Tensor& coef, const Tensor& lo, const Tensor& hi, bool acts,
                          const at::TensorList& ns) {
        const int64_t k = coef.size(0);
        if (scalar_form(coef, lo, hi, ns) && (int64_t)ns.size() == (acts ? 2 * k : k)) {
            const float *cf = coef.data_ptr<float>(), *l = lo.data_ptr<float>(), *h = hi.data_ptr<float>();
            std::vector<double> keep;   // per layer: coef, x = coef * b_w, b_a (acts); then every width's inside flag
            Tensor terms = at::empty({k}, coef.options());
            float* tp = terms.data_ptr<float>();
            const auto clamped = [&](int64_t i) { return std::min(std::max(fval(ns[i]), l[i]), h[i]); };
            for (int64_t i = 0; i < k; i++) {
                const float x = cf[i] * clamped(i);
                const float ba = acts ? clamped(k + i) : 0.0f;
                keep.insert(keep.end(), {cf[i], x, ba});
                tp[i] = acts ? x * ba : x;
            }
            for (size_t i = 0; i < ns.size(); i++) {
                const float v = fval(ns[i]);
                keep.push_back(double(v >= l[i] && v <= h[i]));
            }
            ctx->saved_data["s"] = keep;
            ctx->saved_data["a"] = acts;
            return terms.sum();
        }
        const Tensor n = at::stack(ns);
        const Tensor c = at::clamp(n, lo, hi);
        const Tensor x = coef * c.slice(0, 0, k);
        const Tensor ba = acts ? c.slice(0, k) : Tensor();
        ctx->save_for_backward({coef, x, ba, at::logical_and(at::ge(n, lo), at::le(n, hi))});
        return (acts ? x * ba : x).sum();
    }

    static variable_list backward(AutogradContext* ctx, variable_list grads) {
        variable_list out = {Tensor(), Tensor(), Tensor(), Tensor()};
        if (ctx->saved_data.count("s")) {
            // SumBackward's expand, MulBackward0's g * other ((g * b_a) * coef, g * x), the where: on the values
            const auto keep = ctx->saved_data["s"].toDoubleVector();
            const Tensor g0 = scalar_f32(grads[0]) ? grads[0] : grads[0].to(at::kFloat).cpu().reshape({});
            const float g = fval(g0);
            const bool acts = ctx->saved_data["a"].toBool();
            const int64_t layers = (int64_t)keep.size() / (acts ? 5 : 4);   // 3 values a layer + 1 or 2 flags
            const double* inside = keep.data() + 3 * layers;
            for (int64_t i = 0; i < layers; i++) {
                const float coef = keep[3 * i], ba = keep[3 * i + 2];
                const float v = acts ? (g * ba) * coef : g * coef;
                out.push_back(scalar_of(inside[i] != 0.0 ? v : 0.0f, g0));
            }
            if (acts)
                for (int64_t i = 0; i < layers; i++) {
                    const float v = g * (float)keep[3 * i + 1];
                    out.push_back(scalar_of(inside[layers + i] != 0.0 ? v : 0.0f, g0));
                }
            return out;
        }
        const auto saved = ctx->get_saved_variables();
        const Tensor &coef = saved[0], &x = saved[1], &ba = saved[2], &inside = saved[3];
        const Tensor gl = grads[0].expand(x.sizes());
        Tensor grad = ba.defined() ? at::cat({(gl * ba) * coef, gl * x}) : gl * coef;
        grad = at::where(inside, grad, at::zeros({}, grad.options()));
        for (const Tensor& t : grad.unbind()) out.push_back(t);
        return out;
    }
};

Tensor product_cost(const Tensor& coef, const Tensor& lo, const Tensor& hi, bool acts, at::TensorList ns) {
    return ProductCostNode::apply(coef, lo, hi, acts, ns);
}

// AdaQAT's step of its widths (AdaQATMethod.after_step, bit_opt "sgd"): steps = grad * lr, one clip for all
// (the largest move max_step), then every width clamped to [lo, hi]. The multi-tensor operations of the Python
// loop cost ~2 us a width and operation even from C++; for 0-dim float32 CPU widths and gradients (AdaQAT's) the
// same float arithmetic is done here on the values - ATen's per element: mul by the scalar as float, max over
// |step| (NaN if any is NaN), the clip factor in double as Python computes it, a float product and difference,
// clamp_min / clamp_max keeping NaN - and written back with fill_ where a value changed. Other tensors: the
// multi-tensor operations.
void width_step(at::TensorList live, at::TensorList grads, double lr, double max_step, at::TensorList widths,
                double lo, double hi) {
    at::NoGradGuard no_grad;
    bool direct = true;
    for (const Tensor& t : live) direct = direct && scalar_f32(t);
    for (const Tensor& t : grads) direct = direct && t.defined() && scalar_f32(t);
    for (const Tensor& t : widths) direct = direct && scalar_f32(t);
    if (!direct) {
        if (!live.empty()) {
            const auto steps = at::_foreach_mul(grads, lr);
            const double biggest = at::stack(at::_foreach_abs(steps)).max().item<double>();
            const double k = biggest > 0 ? std::min(1.0, max_step / biggest) : 1.0;
            at::_foreach_sub_(live, at::_foreach_mul(steps, k));
        }
        if (!widths.empty()) {
            at::_foreach_clamp_min_(widths, lo);
            at::_foreach_clamp_max_(widths, hi);
        }
        return;
    }
    const size_t n = live.size();
    if (n) {
        std::vector<float> st(n);
        const float lrf = (float)lr;
        float big = 0.0f;
        bool nan = false;
        for (size_t i = 0; i < n; ++i) {
            st[i] = fval(grads[i]) * lrf;
            const float a = std::fabs(st[i]);
            if (std::isnan(a)) nan = true;
            else if (a > big) big = a;
        }
        const double biggest = nan ? NAN : (double)big;
        const double k = biggest > 0 ? std::min(1.0, max_step / biggest) : 1.0;
        const float kf = (float)k;
        for (size_t i = 0; i < n; ++i) {
            const float d = st[i] * kf;
            live[i].fill_(fval(live[i]) - d);
        }
    }
    const float lof = (float)lo, hif = (float)hi;
    for (const Tensor& t : widths) {
        const float v = fval(t);
        if (std::isnan(v)) continue;   // clamp keeps NaN
        const float c = std::min(std::max(v, lof), hif);
        if (c != v) t.fill_(c);
    }
}

}  // namespace

// For the tests: bfq_sum_ordered of a contiguous float tensor at the probed width, and that width.
Tensor ordered_sum(const Tensor& x) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_cpu() && x.is_contiguous(), "ordered_sum: a contiguous float32 CPU tensor");
    TORCH_CHECK(sum_width() > 0, "ordered_sum: no vector width reproduces torch's sum here");
    return scalar_of(bfq_sum_ordered(x.data_ptr<float>(), x.numel(), sum_width()), x);
}

int64_t ordered_sum_width() { return sum_width(); }

TORCH_LIBRARY(bitfold_q, m) {
    m.def("quant_value(Tensor x, Tensor value, bool relu, float? min_val, Tensor thr, float lo, float hi, "
          "bool ste_clamp) -> Tensor",
          &quant_value);
    m.def("quant_absmax(Tensor w, bool per_channel, int[] stats_shape, float? min_val, Tensor thr, float lo, "
          "float hi, bool ste_clamp) -> Tensor",
          &quant_absmax);
    m.def("quant_linear(Tensor x, Tensor w, Tensor? bias, bool per_channel, int[] stats_shape, float? min_val, "
          "Tensor thr, float lo, float hi, bool ste_clamp) -> Tensor",
          &quant_linear);
    m.def("asq_step(Tensor x, Tensor s, Tensor beta, float n, float p) -> Tensor", &asq_step);
    m.def("row_stats(Tensor flat) -> Tensor", &row_stats);
    m.def("asq_site(Tensor x, Tensor log_s, Tensor w1, Tensor b1, Tensor w2, Tensor b2, float n, float p) -> Tensor",
          &asq_site);
    m.def("asq_adapter(Tensor stats, Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> Tensor", &asq_adapter);
    m.def("post_snap(Tensor w, Tensor alpha, Tensor unit_levels) -> Tensor", &post_snap);
    m.def("tanh_normalize(Tensor w, float min_val) -> Tensor", &tanh_normalize);
    m.def("learned_scale(Tensor n, Tensor? value, bool is_signed, bool narrow, float const_scale, float? min_val, "
          "float lo_b, float hi_b, float frozen) -> Tensor[]",
          &learned_scale);
    m.def("quant_range(Tensor x, Tensor s, Tensor lo, Tensor hi, bool relu, bool ste_clamp, bool unsigned_) -> Tensor",
          &quant_range);
    m.def("quant_learned(Tensor x, Tensor n, Tensor? value, bool is_signed, bool narrow, float const_scale, "
          "float? min_val, float lo_b, float hi_b, float frozen, bool relu, bool ste_clamp) -> Tensor",
          &quant_learned);
    m.def("tanh_learned(Tensor w, Tensor n, float min_val, bool is_signed, bool narrow, float const_scale, "
          "float lo_b, float hi_b, float frozen) -> Tensor",
          &tanh_learned);
    m.def("tanh_learned_linear(Tensor x, Tensor w, Tensor? bias, Tensor n, float min_val, bool is_signed, bool narrow, "
          "float const_scale, float lo_b, float hi_b, float frozen) -> Tensor",
          &tanh_learned_linear);
    m.def("product_cost(Tensor coef, Tensor lo, Tensor hi, bool acts, Tensor[] ns) -> Tensor", &product_cost);
    m.def("width_step(Tensor(a!)[] live, Tensor[] grads, float lr, float max_step, Tensor(b!)[] widths, float lo, "
          "float hi) -> ()",
          &width_step);
    m.def("ordered_sum(Tensor x) -> Tensor", &ordered_sum);
    m.def("ordered_sum_width() -> int", &ordered_sum_width);
}
