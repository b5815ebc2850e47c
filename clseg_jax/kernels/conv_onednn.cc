// oneDNN 2-D convolutions for XLA:CPU as FFI custom calls: forward, backward-data and
// backward-weights, float32, activations NHWC and kernels HWIO (the models' layouts, so no
// activation is ever reordered), any strides, paddings and dilations, one group.
//
// Why: XLA:CPU's 3x3 convolutions, above all their backward passes, ran the W1 step at a third
// of PyTorch's speed; PyTorch's CPU convolutions are oneDNN's (BENCHMARKS.md, issue 18).
//
// Determinism: the direct algorithm and a thread count fixed per call (an attribute), so that a
// shape always runs the same kernel with the same work split and a resumed run is identical.
// Primitives are created once per (shape, attributes) in a mutex-guarded cache; execution uses a
// per-call stream and a user scratchpad, so concurrent calls from XLA's threads share nothing
// mutable.

#include <omp.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

struct Geometry {
  memory::dims src, weights, dst;  // oneDNN's logical order: NCHW, OIHW, NCHW
  memory::dims strides, dilates, pad_l, pad_r;
  int64_t threads;
  int kind;  // 0 forward, 1 backward data, 2 backward weights

  std::string key() const {
    std::ostringstream s;
    for (const auto* d : {&src, &weights, &dst, &strides, &dilates, &pad_l, &pad_r}) {
      for (auto v : *d) s << v << ',';
      s << ';';
    }
    s << threads << ';' << kind;
    return s.str();
  }
};

// A primitive and the reorder between the user's HWIO kernel and the layout it chose.
struct Plan {
  dnnl::primitive conv;
  memory::desc weights_md;  // the primitive's kernel layout
  memory::desc user_weights_md;  // HWIO
  bool reorder;
  dnnl::reorder weights_reorder;  // user -> primitive (fwd, bwd data) or back (bwd weights)
  size_t scratchpad_bytes;
};

const dnnl::engine& Engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::primitive_attr Attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

Plan MakePlan(const Geometry& g) {
  const auto& eng = Engine();
  memory::desc src(g.src, dt::f32, tag::nhwc);
  memory::desc dst(g.dst, dt::f32, tag::nhwc);
  memory::desc any_w(g.weights, dt::f32, tag::any);
  memory::desc user_w(g.weights, dt::f32, tag::hwio);
  auto attr = Attr();
  auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      eng, dnnl::prop_kind::forward_training, algo, src, any_w, dst, g.strides, g.dilates,
      g.pad_l, g.pad_r, attr);
  Plan plan;
  plan.user_weights_md = user_w;
  if (g.kind == 0) {
    plan.conv = dnnl::convolution_forward(fwd);
    plan.weights_md = fwd.weights_desc();
    plan.scratchpad_bytes = fwd.scratchpad_desc().get_size();
  } else if (g.kind == 1) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        eng, algo, src, any_w, dst, g.strides, g.dilates, g.pad_l, g.pad_r, fwd, attr);
    plan.conv = dnnl::convolution_backward_data(bwd);
    plan.weights_md = bwd.weights_desc();
    plan.scratchpad_bytes = bwd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        eng, algo, src, any_w, dst, g.strides, g.dilates, g.pad_l, g.pad_r, fwd, attr);
    plan.conv = dnnl::convolution_backward_weights(bwd);
    plan.weights_md = bwd.diff_weights_desc();
    plan.scratchpad_bytes = bwd.scratchpad_desc().get_size();
  }
  plan.reorder = plan.weights_md != user_w;
  if (plan.reorder) {
    if (g.kind == 2) {
      plan.weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          eng, plan.weights_md, eng, user_w));
    } else {
      plan.weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
          eng, user_w, eng, plan.weights_md));
    }
  }
  return plan;
}

const Plan& GetPlan(const Geometry& g) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<std::string, std::unique_ptr<Plan>>();
  const std::string key = g.key();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it == cache->end()) {
    it = cache->emplace(key, std::make_unique<Plan>(MakePlan(g))).first;
  }
  return *it->second;
}

// NHWC / HWIO dimensions -> oneDNN's logical NCHW / OIHW.
memory::dims Nchw(ffi::Span<const int64_t> d) { return {d[0], d[3], d[1], d[2]}; }
memory::dims Oihw(ffi::Span<const int64_t> d) { return {d[3], d[2], d[0], d[1]}; }

ffi::Error Check(ffi::Span<const int64_t> a, size_t n, const char* what) {
  if (a.size() != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string("clseg_onednn: ") + what + " needs " + std::to_string(n) +
                          " values");
  }
  return ffi::Error::Success();
}

ffi::Error Run(int kind, float* src, float* weights, float* dst, ffi::Span<const int64_t> src_d,
               ffi::Span<const int64_t> w_d, ffi::Span<const int64_t> dst_d,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> padding,
               ffi::Span<const int64_t> dilation, int64_t threads) {
  if (src_d.size() != 4 || w_d.size() != 4 || dst_d.size() != 4) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "clseg_onednn: 2-D convolutions of rank-4 NHWC/HWIO arrays only");
  }
  for (auto e : {Check(strides, 2, "strides"), Check(padding, 4, "padding"),
                 Check(dilation, 2, "dilation")}) {
    if (e.failure()) return e;
  }
  Geometry g;
  g.src = Nchw(src_d);
  g.weights = Oihw(w_d);
  g.dst = Nchw(dst_d);
  g.strides = {strides[0], strides[1]};
  g.dilates = {dilation[0] - 1, dilation[1] - 1};  // oneDNN counts the holes
  g.pad_l = {padding[0], padding[2]};
  g.pad_r = {padding[1], padding[3]};
  g.threads = threads;
  g.kind = kind;
  // Per calling thread: oneDNN sizes its work split by the caller's OpenMP thread count, at
  // creation and at execution alike.
  omp_set_num_threads(static_cast<int>(threads));
  const Plan* plan;
  try {
    plan = &GetPlan(g);
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      std::string("clseg_onednn: no convolution for this geometry: ") + e.what());
  }
  const auto& eng = Engine();
  dnnl::stream stream(eng);
  thread_local std::vector<char> scratch;
  thread_local std::vector<float> wbuf;
  if (scratch.size() < plan->scratchpad_bytes) scratch.resize(plan->scratchpad_bytes);
  memory scratchpad(memory::desc({static_cast<int64_t>(plan->scratchpad_bytes)}, dt::u8, tag::x),
                    eng, scratch.data());
  memory src_m({g.src, dt::f32, tag::nhwc}, eng, src);
  memory dst_m({g.dst, dt::f32, tag::nhwc}, eng, dst);
  memory user_w(plan->user_weights_md, eng, weights);
  memory conv_w = user_w;
  if (plan->reorder) {
    size_t n = plan->weights_md.get_size() / sizeof(float) + 1;
    if (wbuf.size() < n) wbuf.resize(n);
    conv_w = memory(plan->weights_md, eng, wbuf.data());
    if (kind != 2) plan->weights_reorder.execute(stream, user_w, conv_w);
  }
  if (kind == 0) {
    plan->conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, conv_w},
                                {DNNL_ARG_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else if (kind == 1) {
    plan->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, conv_w},
                                {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
  } else {
    plan->conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, conv_w},
                                {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (plan->reorder) plan->weights_reorder.execute(stream, conv_w, user_w);
  }
  stream.wait();
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

// y[N,OH,OW,O] = conv(x[N,H,W,I], w[KH,KW,I,O])
ffi::Error ForwardImpl(F32 x, F32 w, F32Out y, Ints strides, Ints padding, Ints dilation,
                       int64_t threads) {
  return Run(0, x.typed_data(), w.typed_data(), y->typed_data(), x.dimensions(), w.dimensions(),
             y->dimensions(), strides, padding, dilation, threads);
}

// dx[N,H,W,I] from dy[N,OH,OW,O] and w[KH,KW,I,O]
ffi::Error BackwardDataImpl(F32 dy, F32 w, F32Out dx, Ints strides, Ints padding, Ints dilation,
                            int64_t threads) {
  return Run(1, dx->typed_data(), w.typed_data(), dy.typed_data(), dx->dimensions(),
             w.dimensions(), dy.dimensions(), strides, padding, dilation, threads);
}

// dw[KH,KW,I,O] from x[N,H,W,I] and dy[N,OH,OW,O]
ffi::Error BackwardWeightsImpl(F32 x, F32 dy, F32Out dw, Ints strides, Ints padding,
                               Ints dilation, int64_t threads) {
  return Run(2, x.typed_data(), dw->typed_data(), dy.typed_data(), x.dimensions(),
             dw->dimensions(), dy.dimensions(), strides, padding, dilation, threads);
}

}  // namespace

// Two operands, one result, the geometry as attributes: the same binding for all three.
#define CONV_BINDING                   \
  ffi::Ffi::Bind()                     \
      .Arg<F32>()                      \
      .Arg<F32>()                      \
      .Ret<F32>()                      \
      .Attr<Ints>("strides")           \
      .Attr<Ints>("padding")           \
      .Attr<Ints>("dilation")          \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ClsegConvForward, ForwardImpl, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClsegConvBackwardData, BackwardDataImpl, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClsegConvBackwardWeights, BackwardWeightsImpl, CONV_BINDING);

extern "C" int clseg_onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
