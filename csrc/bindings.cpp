// pybind11 module distill_ops._C: raw pointers (as integers), sizes, strides, dtype codes and
// stream handles. No libtorch: the Python layer validates and allocates, the kernels compute.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/logprob_scan.h"
#include "cpu/store_codec.h"
#ifdef DISTILL_OPS_WITH_CUDA
#include "cuda/kernels.cuh"
#endif

namespace py = pybind11;
using distill_ops::KDParams;
using distill_ops::SparseParams;

namespace {

template <typename T>
T* as_ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void dense_kd_cpu(uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t t_ptr, int t_dtype,
                  int64_t t_stride, uintptr_t valid_ptr, uintptr_t labels_ptr, uintptr_t loss_ptr,
                  int loss_dtype, uintptr_t grad_ptr, int grad_dtype, int64_t grad_stride,
                  int64_t grad_cols, int64_t n_rows, int64_t vocab, const KDParams& params,
                  int num_threads) {
  distill_ops::cpu::dense_kd({as_ptr<const void>(s_ptr), s_dtype, s_stride},
                             {as_ptr<const void>(t_ptr), t_dtype, t_stride},
                             as_ptr<const uint8_t>(valid_ptr), as_ptr<const int64_t>(labels_ptr),
                             as_ptr<void>(loss_ptr), loss_dtype, as_ptr<void>(grad_ptr),
                             grad_dtype, grad_stride, grad_cols, n_rows, vocab, params,
                             num_threads);
}

void dense_vp_cpu(int phase, uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t t_ptr,
                  int t_dtype, int64_t t_stride, uintptr_t valid_ptr, uintptr_t labels_ptr,
                  uintptr_t rec_ptr, uintptr_t aux_ptr, uintptr_t grad_ptr, int grad_dtype,
                  int64_t n_rows, int64_t width, const KDParams& params, bool lean,
                  int num_threads) {
  distill_ops::cpu::dense_vp(phase, {as_ptr<const void>(s_ptr), s_dtype, s_stride},
                             {as_ptr<const void>(t_ptr), t_dtype, t_stride},
                             as_ptr<const uint8_t>(valid_ptr), as_ptr<const int64_t>(labels_ptr),
                             as_ptr<double>(rec_ptr), as_ptr<double>(aux_ptr),
                             as_ptr<void>(grad_ptr), grad_dtype, n_rows, width, params, lean,
                             num_threads);
}

void sparse_vp_cpu(int phase, uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t idx_ptr,
                   int64_t k, int64_t offset, uintptr_t valid_ptr, uintptr_t labels_ptr,
                   uintptr_t rec_ptr, uintptr_t zsup_ptr, uintptr_t sup_grad_ptr,
                   uintptr_t grad_ptr, int grad_dtype, int64_t n_rows, int64_t width,
                   double temperature, double hard_weight, bool lean, int num_threads) {
  distill_ops::cpu::sparse_vp(phase, {as_ptr<const void>(s_ptr), s_dtype, s_stride},
                              as_ptr<const int64_t>(idx_ptr), k, offset,
                              as_ptr<const uint8_t>(valid_ptr), as_ptr<const int64_t>(labels_ptr),
                              as_ptr<double>(rec_ptr), as_ptr<double>(zsup_ptr),
                              as_ptr<const double>(sup_grad_ptr), as_ptr<void>(grad_ptr),
                              grad_dtype, n_rows, width, temperature, hard_weight, lean,
                              num_threads);
}

void sparse_kd_cpu(uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t idx_ptr,
                   uintptr_t tlp_ptr, int tlp_dtype, int64_t k, uintptr_t valid_ptr,
                   uintptr_t labels_ptr, uintptr_t loss_ptr, int loss_dtype, uintptr_t grad_ptr,
                   int grad_dtype, int64_t grad_stride, int64_t n_rows, int64_t vocab,
                   const SparseParams& params, int num_threads) {
  distill_ops::cpu::sparse_kd({as_ptr<const void>(s_ptr), s_dtype, s_stride},
                              as_ptr<const int64_t>(idx_ptr), as_ptr<const void>(tlp_ptr),
                              tlp_dtype, k, as_ptr<const uint8_t>(valid_ptr),
                              as_ptr<const int64_t>(labels_ptr), as_ptr<void>(loss_ptr),
                              loss_dtype, as_ptr<void>(grad_ptr), grad_dtype, grad_stride,
                              n_rows, vocab, params, num_threads);
}

void topk_logprobs_cpu(uintptr_t x_ptr, int x_dtype, int64_t x_stride, int64_t n_rows,
                       int64_t vocab, int64_t k, double scale, double softcap,
                       double temperature, uintptr_t idx_ptr, uintptr_t lp_ptr, int lp_dtype,
                       int num_threads) {
  distill_ops::cpu::topk_logprobs({as_ptr<const void>(x_ptr), x_dtype, x_stride}, n_rows, vocab,
                                  k, scale, softcap, temperature, as_ptr<int32_t>(idx_ptr),
                                  as_ptr<void>(lp_ptr), lp_dtype, num_threads);
}

void sample_cdf_cpu(uintptr_t x_ptr, int x_dtype, int64_t x_stride, int64_t n_rows,
                    int64_t vocab, double inv_t, uintptr_t u_ptr, int64_t n_draws,
                    uintptr_t draws_ptr, uintptr_t totals_ptr, int num_threads) {
  distill_ops::cpu::sample_cdf({as_ptr<const void>(x_ptr), x_dtype, x_stride}, n_rows, vocab,
                               inv_t, as_ptr<const double>(u_ptr), n_draws,
                               as_ptr<int64_t>(draws_ptr), as_ptr<double>(totals_ptr),
                               num_threads);
}

void scale_rows_cpu(uintptr_t grad_ptr, uintptr_t out_ptr, int dtype, uintptr_t scale_ptr,
                    int scale_dtype, int64_t scale_stride, int64_t n_rows, int64_t n_cols,
                    int num_threads) {
  distill_ops::cpu::scale_rows(as_ptr<const void>(grad_ptr), as_ptr<void>(out_ptr), dtype,
                               as_ptr<const void>(scale_ptr), scale_dtype, scale_stride, n_rows,
                               n_cols, num_threads);
}

// One sequence's store payload: (bytes, max |error| of head values, ... of the others).
std::tuple<py::bytes, double, double> store_encode(uintptr_t ids_ptr, uintptr_t lp_ptr, int64_t T,
                                                   const distill_ops::store::CodecParams& p) {
  std::vector<uint8_t> out;
  distill_ops::store::EncodeStats st;
  {
    py::gil_scoped_release release;
    out.reserve(size_t(T * p.k) * 4 + 16);
    st = distill_ops::store::encode(as_ptr<const int32_t>(ids_ptr), as_ptr<const float>(lp_ptr),
                                    T, p, out);
  }
  return {py::bytes(reinterpret_cast<const char*>(out.data()), out.size()), st.max_err_head,
          st.max_err_tail};
}

bool store_decode(uintptr_t data_ptr, int64_t nbytes, int64_t T,
                  const distill_ops::store::CodecParams& p, uintptr_t ids_ptr, uintptr_t lp_ptr) {
  return distill_ops::store::decode(as_ptr<const uint8_t>(data_ptr), nbytes, T, p,
                                    as_ptr<int32_t>(ids_ptr), as_ptr<float>(lp_ptr));
}

using distill_ops::ingest::TokenMap;

// The student vocabulary as a TokenMap: item i is token i's bytes, or None (no bytes).
TokenMap make_token_map(const py::list& tokens) {
  std::vector<std::string> bytes(tokens.size());
  std::vector<bool> present(tokens.size(), false);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i].is_none()) continue;
    bytes[i] = tokens[i].cast<std::string>();
    present[i] = true;
  }
  return TokenMap(bytes, present);
}

py::object str_or_none(bool has, const std::string& s) {
  return has ? py::object(py::str(s)) : py::object(py::none());
}

// One JSONL record of OpenAI-style logprobs: (status, custom_id, id, temperature, rows,
// ids bytes (int32 rows x k), logprobs bytes (float32), tokens bytes (int64), unmapped
// alternatives, dropped alternatives, cut positions, most alternatives at a position).
py::tuple scan_openai(const py::bytes& line, const TokenMap& map, int k, bool skip_unmappable) {
  const std::string_view view = line;
  distill_ops::ingest::ScanResult r;
  {
    py::gil_scoped_release release;
    r = distill_ops::ingest::scan_openai(view.data(), view.size(), map, k, skip_unmappable);
  }
  auto raw = [](const auto& v) {
    return py::bytes(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(v[0]));
  };
  return py::make_tuple(
      int(r.status), str_or_none(r.has_custom_id, r.custom_id), str_or_none(r.has_id, r.id),
      r.has_temperature ? py::object(py::float_(r.temperature)) : py::object(py::none()),
      r.rows, raw(r.ids), raw(r.lps), raw(r.tokens), r.unmapped_alternatives,
      r.dropped_alternatives, r.cut_positions, r.max_alternatives);
}

#ifdef DISTILL_OPS_WITH_CUDA
void dense_kd_cuda(uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t t_ptr, int t_dtype,
                   int64_t t_stride, uintptr_t valid_ptr, uintptr_t labels_ptr,
                   uintptr_t loss_ptr, uintptr_t grad_ptr, int64_t grad_stride,
                   int64_t grad_cols, int64_t n_rows, int64_t vocab, const KDParams& params,
                   int variant, uintptr_t stream) {
  distill_ops::cuda::dense_kd(as_ptr<const void>(s_ptr), s_dtype, s_stride,
                              as_ptr<const void>(t_ptr), t_dtype, t_stride,
                              as_ptr<const uint8_t>(valid_ptr), as_ptr<const int64_t>(labels_ptr),
                              as_ptr<float>(loss_ptr), as_ptr<void>(grad_ptr), grad_stride,
                              grad_cols, n_rows, vocab, params, variant, as_ptr<void>(stream));
}

void sparse_kd_cuda(uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t idx_ptr,
                    uintptr_t tlp_ptr, int64_t k, uintptr_t valid_ptr, uintptr_t labels_ptr,
                    uintptr_t loss_ptr, uintptr_t grad_ptr, int64_t n_rows, int64_t vocab,
                    const SparseParams& params, uintptr_t stream) {
  distill_ops::cuda::sparse_kd(as_ptr<const void>(s_ptr), s_dtype, s_stride,
                               as_ptr<const int64_t>(idx_ptr), as_ptr<const float>(tlp_ptr), k,
                               as_ptr<const uint8_t>(valid_ptr),
                               as_ptr<const int64_t>(labels_ptr), as_ptr<float>(loss_ptr),
                               as_ptr<void>(grad_ptr), n_rows, vocab, params,
                               as_ptr<void>(stream));
}

void dense_vp_cuda(int phase, uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t t_ptr,
                   int t_dtype, int64_t t_stride, uintptr_t valid_ptr, uintptr_t labels_ptr,
                   uintptr_t rec_ptr, uintptr_t grad_ptr, int64_t g_stride, int64_t n_rows,
                   int64_t width, const KDParams& params, uintptr_t stream) {
  distill_ops::cuda::dense_vp(phase, as_ptr<const void>(s_ptr), s_dtype, s_stride,
                              as_ptr<const void>(t_ptr), t_dtype, t_stride,
                              as_ptr<const uint8_t>(valid_ptr), as_ptr<const int64_t>(labels_ptr),
                              as_ptr<double>(rec_ptr), as_ptr<void>(grad_ptr), g_stride, n_rows,
                              width, params, as_ptr<void>(stream));
}

void sparse_vp_cuda(int phase, uintptr_t s_ptr, int s_dtype, int64_t s_stride, uintptr_t idx_ptr,
                    int64_t k, int64_t offset, uintptr_t valid_ptr, uintptr_t labels_ptr,
                    uintptr_t rec_ptr, uintptr_t zsup_ptr, uintptr_t sup_grad_ptr,
                    uintptr_t grad_ptr, int64_t n_rows, int64_t width, double temperature,
                    double hard_weight, uintptr_t stream) {
  distill_ops::cuda::sparse_vp(phase, as_ptr<const void>(s_ptr), s_dtype, s_stride,
                               as_ptr<const int64_t>(idx_ptr), k, offset,
                               as_ptr<const uint8_t>(valid_ptr),
                               as_ptr<const int64_t>(labels_ptr), as_ptr<double>(rec_ptr),
                               as_ptr<double>(zsup_ptr), as_ptr<const double>(sup_grad_ptr),
                               as_ptr<void>(grad_ptr), n_rows, width, temperature, hard_weight,
                               as_ptr<void>(stream));
}

void topk_logprobs_cuda(uintptr_t x_ptr, int x_dtype, int64_t x_stride, int64_t n_rows,
                        int64_t vocab, int64_t k, double scale, double softcap,
                        double temperature, uintptr_t idx_ptr, uintptr_t lp_ptr,
                        uintptr_t stream) {
  distill_ops::cuda::topk_logprobs(as_ptr<const void>(x_ptr), x_dtype, x_stride, n_rows, vocab,
                                   k, float(scale), float(softcap), float(temperature),
                                   as_ptr<int32_t>(idx_ptr), as_ptr<float>(lp_ptr),
                                   as_ptr<void>(stream));
}

void scale_rows_cuda(uintptr_t grad_ptr, int dtype, uintptr_t scale_ptr, int64_t scale_stride,
                     int64_t n_rows, int64_t n_cols, uintptr_t stream) {
  distill_ops::cuda::scale_rows_(as_ptr<void>(grad_ptr), dtype, as_ptr<const float>(scale_ptr),
                                 scale_stride, n_rows, n_cols, as_ptr<void>(stream));
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "distill_ops native kernels (CPU always; CUDA when built with nvcc)";

  py::class_<KDParams>(m, "KDParams")
      .def(py::init<>())
      .def_readwrite("divergence", &KDParams::divergence)
      .def_readwrite("temperature", &KDParams::temperature)
      .def_readwrite("beta", &KDParams::beta)
      .def_readwrite("param2", &KDParams::param2)
      .def_readwrite("interp", &KDParams::interp)
      .def_readwrite("scale_s", &KDParams::scale_s)
      .def_readwrite("cap_s", &KDParams::cap_s)
      .def_readwrite("scale_t", &KDParams::scale_t)
      .def_readwrite("cap_t", &KDParams::cap_t)
      .def_readwrite("hard_weight", &KDParams::hard_weight)
      .def_readwrite("soft_coef", &KDParams::soft_coef);

  py::class_<SparseParams>(m, "SparseParams")
      .def(py::init<>())
      .def_readwrite("divergence", &SparseParams::divergence)
      .def_readwrite("tail", &SparseParams::tail)
      .def_readwrite("temperature", &SparseParams::temperature)
      .def_readwrite("source_temperature", &SparseParams::source_temperature)
      .def_readwrite("beta", &SparseParams::beta)
      .def_readwrite("param2", &SparseParams::param2)
      .def_readwrite("interp", &SparseParams::interp)
      .def_readwrite("hard_weight", &SparseParams::hard_weight)
      .def_readwrite("soft_coef", &SparseParams::soft_coef);

  py::class_<distill_ops::store::CodecParams>(m, "CodecParams")
      .def(py::init<>())
      .def_readwrite("vocab", &distill_ops::store::CodecParams::vocab)
      .def_readwrite("k", &distill_ops::store::CodecParams::k)
      .def_readwrite("encoding", &distill_ops::store::CodecParams::encoding)
      .def_readwrite("head", &distill_ops::store::CodecParams::head)
      .def_readwrite("head_tol", &distill_ops::store::CodecParams::head_tol)
      .def_readwrite("tail_tol", &distill_ops::store::CodecParams::tail_tol)
      .def_readwrite("head_min_bits", &distill_ops::store::CodecParams::head_min_bits);
  m.def("store_encode", &store_encode,
        "Encodes one sequence's targets (ids [T, k] int32, logprobs [T, k] float32).");
  m.def("store_decode", &store_decode, py::call_guard<py::gil_scoped_release>(),
        "Decodes one sequence's payload into ids [T, k] int32 and logprobs [T, k] float32.");
  m.def("store_id_bits", &distill_ops::store::id_bits, "ceil(log2(V)) bits, at least 1.");
  py::class_<TokenMap>(m, "TokenMap")
      .def(py::init(&make_token_map), "Token bytes -> id; item i is bytes or None.")
      .def_property_readonly("size", &TokenMap::size);
  m.def("scan_openai", &scan_openai, py::arg("line"), py::arg("map"), py::arg("k"),
        py::arg("skip_unmappable"),
        "One JSON Lines record of OpenAI-style logprobs into target rows (see logprob_scan.h).");
  m.def("sparse_kd_cpu", &sparse_kd_cpu, py::call_guard<py::gil_scoped_release>(),
        "Fused sparse (top-k / sampled targets) KD loss and student gradient, per row (CPU).");
  m.def("topk_logprobs_cpu", &topk_logprobs_cpu, py::call_guard<py::gil_scoped_release>(),
        "Fused log-softmax normaliser and top-k per row (CPU).");
  m.def("dense_kd_cpu", &dense_kd_cpu, py::call_guard<py::gil_scoped_release>(),
        "Fused dense KD loss and student gradient, per row (CPU).");
  m.def("dense_vp_cpu", &dense_vp_cpu, py::call_guard<py::gil_scoped_release>(),
        "One phase of the vocab-parallel dense KD loss on a slice (CPU).");
  m.def("sparse_vp_cpu", &sparse_vp_cpu, py::call_guard<py::gil_scoped_release>(),
        "One phase of the vocab-parallel sparse KD loss on a slice (CPU).");
  m.def("sample_cdf_cpu", &sample_cdf_cpu, py::call_guard<py::gil_scoped_release>(),
        "Inverse-CDF draws from softmax(x / T) per row, and each row's total (CPU).");
  m.def("scale_rows_cpu", &scale_rows_cpu, py::call_guard<py::gil_scoped_release>(),
        "out[r, :] = grad[r, :] * scale[r] (CPU).");
#ifdef DISTILL_OPS_WITH_CUDA
  m.def("dense_kd_cuda", &dense_kd_cuda, py::call_guard<py::gil_scoped_release>(),
        "Fused dense KD loss and student gradient, per row (CUDA, caller's stream).");
  m.def("scale_rows_cuda", &scale_rows_cuda, py::call_guard<py::gil_scoped_release>(),
        "grad[r, :] *= scale[r] in place (CUDA, caller's stream).");
  m.def("sparse_kd_cuda", &sparse_kd_cuda, py::call_guard<py::gil_scoped_release>(),
        "Fused sparse KD loss and student gradient, per row (CUDA, caller's stream).");
  m.def("dense_vp_cuda", &dense_vp_cuda, py::call_guard<py::gil_scoped_release>(),
        "One phase of the vocab-parallel dense KD loss on a slice (CUDA, caller's stream).");
  m.def("sparse_vp_cuda", &sparse_vp_cuda, py::call_guard<py::gil_scoped_release>(),
        "One phase of the vocab-parallel sparse KD loss on a slice (CUDA, caller's stream).");
  m.def("topk_logprobs_cuda", &topk_logprobs_cuda, py::call_guard<py::gil_scoped_release>(),
        "Fused log-softmax normaliser and top-k per row (CUDA, caller's stream).");
  m.attr("cuda_topk_max") = distill_ops::cuda::kTopKMax;
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
