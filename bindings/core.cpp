// lockstep._core: the host-side runtime core, exposed to Python.
//
// The C++ classes know nothing of Python; this file only names things. C++
// std::invalid_argument surfaces as ValueError (pybind11's built-in translation) and
// lockstep::ArenaExhausted as ArenaExhaustedError, a RuntimeError subclass the scheduler
// catches to preempt or queue.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "block_allocator.h"
#include "cpu/cpu_ops.h"
#include "cpu/quant_matmul.h"
#include "cpu/sampling.h"
#include "cpu/thread_pool.h"
#include "step_planner.h"

namespace py = pybind11;
using lockstep::BlockAllocator;

namespace {

// ---- CPU kernels: numpy arrays in, checked here so that no malformed array reaches C++. ----

std::string shape_of(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// The numpy array behind `obj`: `ndim`-D, of `dtype`, C-contiguous, or, with `strided_rows`,
// contiguous within each row of dimension 0 and any non-negative whole-element row stride.
py::array array_arg(const char* name, const py::object& obj, const py::dtype& dtype,
                    const char* dtype_name, py::ssize_t ndim, bool strided_rows = false) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::value_error(std::string(name) + ": expected a numpy.ndarray of " + dtype_name +
                          ", got " + std::string(py::str(py::type::of(obj).attr("__name__"))) +
                          " (pass a CPU torch tensor as tensor.numpy())");
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!a.dtype().equal(dtype)) {
    throw py::value_error(std::string(name) + ": expected dtype " + dtype_name + ", got " +
                          std::string(py::str(a.dtype())));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + ": expected a " + std::to_string(ndim) +
                          "-D array, got shape " + shape_of(a));
  }
  bool ok = true;
  if (strided_rows) {
    py::ssize_t inner = a.itemsize();
    for (py::ssize_t i = ndim - 1; i >= 1; --i) {
      ok = ok && (a.shape(i) == 1 || a.strides(i) == inner);
      inner *= a.shape(i);
    }
    ok = ok && a.strides(0) >= 0 && a.strides(0) % a.itemsize() == 0 &&
         (a.shape(0) <= 1 || a.strides(0) >= inner);
  } else {
    ok = (a.flags() & py::array::c_style) != 0;
  }
  if (!ok) {
    throw py::value_error(std::string(name) +
                          (strided_rows ? ": each row must be C-contiguous" : ": must be C-contiguous") +
                          " (use numpy.ascontiguousarray or tensor.contiguous())");
  }
  return a;
}

bool overlaps(const py::array& a, const py::array& b) {
  const auto* a0 = static_cast<const char*>(a.data());
  const auto* b0 = static_cast<const char*>(b.data());
  return a.nbytes() > 0 && b.nbytes() > 0 && a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

void quant_matmul(const py::object& x_obj, const py::object& w_obj, const std::string& qtype,
                  const py::object& out_obj, const std::string& isa) {
  namespace cpu = lockstep::cpu;
  const py::array x = array_arg("x", x_obj, py::dtype::of<float>(), "float32", 2);
  const py::array w = array_arg("w", w_obj, py::dtype::of<std::uint8_t>(), "uint8", 2);
  py::array out = array_arg("out", out_obj, py::dtype::of<float>(), "float32", 2);
  const cpu::QType q = cpu::parse_qtype(qtype);
  const cpu::Isa i = cpu::parse_isa(isa);
  const std::int64_t M = x.shape(0), K = x.shape(1), N = w.shape(0), row_bytes = w.shape(1);
  if (out.shape(0) != M || out.shape(1) != N) {
    throw py::value_error("out: expected shape (" + std::to_string(M) + ", " +
                          std::to_string(N) + ") = (rows of x, rows of w), got " +
                          shape_of(out));
  }
  if (!out.writeable()) throw py::value_error("out: is read-only");
  if (overlaps(out, x)) throw py::value_error("out: overlaps x in memory");
  if (overlaps(out, w)) throw py::value_error("out: overlaps w in memory");
  const auto* xp = static_cast<const float*>(x.data());
  const auto* wp = static_cast<const std::uint8_t*>(w.data());
  auto* op = static_cast<float*>(out.mutable_data());
  // The shape and ISA checks inside throw before any work; the GIL comes back as the
  // exception unwinds through `release`.
  py::gil_scoped_release release;
  cpu::quant_matmul(xp, M, K, wp, N, row_bytes, q, op, i);
}

void dequantize_rows(const py::object& w_obj, const std::string& qtype, const py::object& ids_obj,
                     const py::object& out_obj) {
  namespace cpu = lockstep::cpu;
  const py::array w = array_arg("w", w_obj, py::dtype::of<std::uint8_t>(), "uint8", 2);
  const py::array ids = array_arg("ids", ids_obj, py::dtype::of<std::int64_t>(), "int64", 1);
  py::array out = array_arg("out", out_obj, py::dtype::of<float>(), "float32", 2);
  const cpu::QType q = cpu::parse_qtype(qtype);
  const std::int64_t K = cpu::row_elements(q, w.shape(1));
  if (out.shape(0) != ids.shape(0) || out.shape(1) != K) {
    throw py::value_error("out: expected shape (" + std::to_string(ids.shape(0)) + ", " +
                          std::to_string(K) + ") = (ids, weights in a row of w), got " +
                          shape_of(out));
  }
  if (!out.writeable()) throw py::value_error("out: is read-only");
  if (overlaps(out, w)) throw py::value_error("out: overlaps w in memory");
  if (overlaps(out, ids)) throw py::value_error("out: overlaps ids in memory");
  const auto* wp = static_cast<const std::uint8_t*>(w.data());
  const auto* ip = static_cast<const std::int64_t*>(ids.data());
  auto* op = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  cpu::dequantize_rows(wp, w.shape(0), w.shape(1), q, ip, ids.shape(0), op);
}

// ---- CPU step ops (cpp/cpu/cpu_ops.h), checked by the same array_arg. ----

void expect_shape(const char* name, const py::array& a, std::initializer_list<py::ssize_t> shape,
                  const char* meaning) {
  py::ssize_t i = 0;
  bool same = true;
  std::string want = "(";
  for (py::ssize_t n : shape) {
    same = same && a.shape(i) == n;
    want += (i++ ? ", " : "") + std::to_string(n);
  }
  want += shape.size() == 1 ? ",)" : ")";
  if (!same) {
    throw py::value_error(std::string(name) + ": expected shape " + want + " = " + meaning +
                          ", got " + shape_of(a));
  }
}

// The bytes [first, last) an array with non-negative strides can touch.
std::pair<const char*, const char*> extent(const py::array& a) {
  const auto* first = static_cast<const char*>(a.data());
  if (a.size() == 0) return {first, first};
  py::ssize_t span = a.itemsize();
  for (py::ssize_t i = 0; i < a.ndim(); ++i) span += (a.shape(i) - 1) * a.strides(i);
  return {first, first + span};
}

void expect_apart(const char* name, const py::array& a, const char* other_name,
                  const py::array& b) {
  const auto [a0, a1] = extent(a);
  const auto [b0, b1] = extent(b);
  if (a0 < b1 && b0 < a1) {
    throw py::value_error(std::string(name) + ": overlaps " + other_name + " in memory");
  }
}

void expect_writeable(const char* name, const py::array& a) {
  if (!a.writeable()) throw py::value_error(std::string(name) + ": is read-only");
}

lockstep::cpu::Heads heads_of(py::array& a) {
  return {static_cast<float*>(a.mutable_data()), a.shape(0), a.shape(1), a.shape(2),
          a.strides(0) / a.itemsize()};
}

void rms_norm(const py::object& x_obj, const py::object& weight_obj, float eps,
              const py::object& out_obj) {
  const py::array x = array_arg("x", x_obj, py::dtype::of<float>(), "float32", 2);
  const py::array weight = array_arg("weight", weight_obj, py::dtype::of<float>(), "float32", 1);
  py::array out = array_arg("out", out_obj, py::dtype::of<float>(), "float32", 2);
  expect_shape("weight", weight, {x.shape(1)}, "(columns of x,)");
  expect_shape("out", out, {x.shape(0), x.shape(1)}, "x's shape");
  expect_writeable("out", out);
  expect_apart("out", out, "weight", weight);
  if (out.data() != x.data()) expect_apart("out", out, "x", x);
  const auto* xp = static_cast<const float*>(x.data());
  const auto* wp = static_cast<const float*>(weight.data());
  auto* op = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  lockstep::cpu::rms_norm(xp, x.shape(0), x.shape(1), wp, eps, op);
}

void add_rms_norm(const py::object& x_obj, const py::object& residual_obj,
                  const py::object& weight_obj, float eps, const py::object& out_obj) {
  const py::array x = array_arg("x", x_obj, py::dtype::of<float>(), "float32", 2);
  py::array residual = array_arg("residual", residual_obj, py::dtype::of<float>(), "float32", 2);
  const py::array weight = array_arg("weight", weight_obj, py::dtype::of<float>(), "float32", 1);
  py::array out = array_arg("out", out_obj, py::dtype::of<float>(), "float32", 2);
  expect_shape("residual", residual, {x.shape(0), x.shape(1)}, "x's shape");
  expect_shape("weight", weight, {x.shape(1)}, "(columns of x,)");
  expect_shape("out", out, {x.shape(0), x.shape(1)}, "x's shape");
  expect_writeable("residual", residual);
  expect_writeable("out", out);
  expect_apart("residual", residual, "x", x);
  expect_apart("residual", residual, "weight", weight);
  expect_apart("out", out, "x", x);
  expect_apart("out", out, "residual", residual);
  expect_apart("out", out, "weight", weight);
  const auto* xp = static_cast<const float*>(x.data());
  auto* rp = static_cast<float*>(residual.mutable_data());
  const auto* wp = static_cast<const float*>(weight.data());
  auto* op = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  lockstep::cpu::add_rms_norm(xp, rp, x.shape(0), x.shape(1), wp, eps, op);
}

void rope_and_cache(const py::object& q_obj, const py::object& k_obj, const py::object& v_obj,
                    const py::object& cos_obj, const py::object& sin_obj,
                    const py::object& positions_obj, const py::object& slots_obj,
                    const py::object& k_cache_obj, const py::object& v_cache_obj) {
  const auto f32 = py::dtype::of<float>();
  const auto i64 = py::dtype::of<std::int64_t>();
  py::array q = array_arg("q", q_obj, f32, "float32", 3, true);
  py::array k = array_arg("k", k_obj, f32, "float32", 3, true);
  py::array v = array_arg("v", v_obj, f32, "float32", 3, true);
  const py::array cos = array_arg("cos", cos_obj, f32, "float32", 2);
  const py::array sin = array_arg("sin", sin_obj, f32, "float32", 2);
  const py::array positions = array_arg("positions", positions_obj, i64, "int64", 1);
  const py::array slots = array_arg("slots", slots_obj, i64, "int64", 1);
  py::array k_cache = array_arg("k_cache", k_cache_obj, f32, "float32", 3);
  py::array v_cache = array_arg("v_cache", v_cache_obj, f32, "float32", 3);
  const py::ssize_t T = q.shape(0), D = q.shape(2), kv_heads = k.shape(1);
  if (D % 2 != 0) throw py::value_error("q: head_dim must be even, got " + std::to_string(D));
  expect_shape("k", k, {T, kv_heads, D}, "(rows of q, kv heads, head_dim of q)");
  expect_shape("v", v, {T, kv_heads, D}, "k's shape");
  expect_shape("cos", cos, {cos.shape(0), D / 2}, "(positions, head_dim / 2)");
  expect_shape("sin", sin, {cos.shape(0), D / 2}, "cos's shape");
  expect_shape("positions", positions, {T}, "(rows of q,)");
  expect_shape("slots", slots, {T}, "(rows of q,)");
  expect_shape("k_cache", k_cache, {k_cache.shape(0), kv_heads, D}, "(slots, kv heads, head_dim)");
  expect_shape("v_cache", v_cache, {k_cache.shape(0), kv_heads, D}, "k_cache's shape");
  for (auto [name, a] : {std::pair<const char*, py::array*>{"q", &q}, {"k", &k}, {"v", &v},
                         {"k_cache", &k_cache}, {"v_cache", &v_cache}}) {
    expect_writeable(name, *a);
  }
  expect_apart("k_cache", k_cache, "v_cache", v_cache);
  for (auto [name, a] : {std::pair<const char*, const py::array*>{"q", &q}, {"k", &k}, {"v", &v},
                         {"cos", &cos}, {"sin", &sin}}) {
    expect_apart("k_cache", k_cache, name, *a);
    expect_apart("v_cache", v_cache, name, *a);
  }
  const lockstep::cpu::Heads qh = heads_of(q), kh = heads_of(k), vh = heads_of(v);
  const auto* cp = static_cast<const float*>(cos.data());
  const auto* sp = static_cast<const float*>(sin.data());
  const auto* pp = static_cast<const std::int64_t*>(positions.data());
  const auto* slp = static_cast<const std::int64_t*>(slots.data());
  auto* kcp = static_cast<float*>(k_cache.mutable_data());
  auto* vcp = static_cast<float*>(v_cache.mutable_data());
  const py::ssize_t P = cos.shape(0), num_slots = k_cache.shape(0);
  py::gil_scoped_release release;
  lockstep::cpu::rope_and_cache(qh, kh, vh, cp, sp, P, pp, slp, kcp, vcp, num_slots);
}

void paged_attention(const py::object& q_obj, const py::object& k_cache_obj,
                     const py::object& v_cache_obj, const py::object& block_tables_obj,
                     const py::object& query_start_obj, const py::object& seq_lens_obj,
                     std::int64_t block_size, float scale, const py::object& out_obj) {
  const auto f32 = py::dtype::of<float>();
  const auto i32 = py::dtype::of<std::int32_t>();
  py::array q = array_arg("q", q_obj, f32, "float32", 3, true);
  const py::array k_cache = array_arg("k_cache", k_cache_obj, f32, "float32", 3);
  const py::array v_cache = array_arg("v_cache", v_cache_obj, f32, "float32", 3);
  const py::array block_tables = array_arg("block_tables", block_tables_obj, i32, "int32", 2);
  const py::array query_start = array_arg("query_start", query_start_obj, i32, "int32", 1);
  const py::array seq_lens = array_arg("seq_lens", seq_lens_obj, i32, "int32", 1);
  py::array out = array_arg("out", out_obj, f32, "float32", 2);
  const py::ssize_t T = q.shape(0), Hq = q.shape(1), D = q.shape(2), S = block_tables.shape(0);
  expect_shape("k_cache", k_cache, {k_cache.shape(0), k_cache.shape(1), D},
               "(slots, kv heads, head_dim of q)");
  expect_shape("v_cache", v_cache, {k_cache.shape(0), k_cache.shape(1), D}, "k_cache's shape");
  expect_shape("query_start", query_start, {S + 1}, "(rows of block_tables + 1,)");
  expect_shape("seq_lens", seq_lens, {S}, "(rows of block_tables,)");
  expect_shape("out", out, {T, Hq * D}, "(rows of q, heads * head_dim of q)");
  expect_writeable("out", out);
  expect_apart("out", out, "q", q);
  expect_apart("out", out, "k_cache", k_cache);
  expect_apart("out", out, "v_cache", v_cache);
  const lockstep::cpu::Heads qh = heads_of(q);
  const auto* kp = static_cast<const float*>(k_cache.data());
  const auto* vp = static_cast<const float*>(v_cache.data());
  const lockstep::cpu::PagedBatch batch{static_cast<const std::int32_t*>(block_tables.data()),
                                        static_cast<const std::int32_t*>(query_start.data()),
                                        static_cast<const std::int32_t*>(seq_lens.data()), S,
                                        block_tables.shape(1), block_size};
  auto* op = static_cast<float*>(out.mutable_data());
  const py::ssize_t num_slots = k_cache.shape(0), kv_heads = k_cache.shape(1);
  py::gil_scoped_release release;
  lockstep::cpu::paged_attention(qh, kp, vp, num_slots, kv_heads, batch, scale, op);
}

// ---- CPU sampler (cpp/cpu/sampling.h) ----

// Elements from one row of a [R, V] array (rows contiguous) to the next; a lone row's is V.
std::int64_t row_stride(const py::array& rows) {
  return rows.shape(0) > 1 ? rows.strides(0) / rows.itemsize() : rows.shape(1);
}

void sample_tokens(const py::object& logits_obj, const py::object& temperature_obj,
                   const py::object& top_k_obj, const py::object& top_p_obj,
                   const py::object& min_p_obj, const py::object& seeds_obj,
                   const py::object& positions_obj, const py::object& branches_obj,
                   const py::object& tokens_out_obj, const py::object& logprobs_out_obj) {
  const auto f32 = py::dtype::of<float>();
  const auto i64 = py::dtype::of<std::int64_t>();
  const py::array logits = array_arg("logits", logits_obj, f32, "float32", 2, true);
  const py::ssize_t R = logits.shape(0);
  const auto column = [R](const char* name, const py::object& obj, const py::dtype& dtype,
                          const char* dtype_name) {
    py::array a = array_arg(name, obj, dtype, dtype_name, 1);
    expect_shape(name, a, {R}, "(rows of logits,)");
    return a;
  };
  const py::array temperature = column("temperature", temperature_obj, f32, "float32");
  const py::array top_k = column("top_k", top_k_obj, i64, "int64");
  const py::array top_p = column("top_p", top_p_obj, f32, "float32");
  const py::array min_p = column("min_p", min_p_obj, f32, "float32");
  const py::array seeds = column("seeds", seeds_obj, py::dtype::of<std::uint64_t>(), "uint64");
  const py::array positions = column("positions", positions_obj, i64, "int64");
  const py::array branches = column("branches", branches_obj, i64, "int64");
  py::array tokens_out = column("tokens_out", tokens_out_obj, i64, "int64");
  expect_writeable("tokens_out", tokens_out);
  expect_apart("tokens_out", tokens_out, "logits", logits);
  float* logprobs_out = nullptr;
  py::array logprobs;  // held until the call returns
  if (!logprobs_out_obj.is_none()) {
    logprobs = column("logprobs_out", logprobs_out_obj, f32, "float32");
    expect_writeable("logprobs_out", logprobs);
    expect_apart("logprobs_out", logprobs, "logits", logits);
    logprobs_out = static_cast<float*>(logprobs.mutable_data());
  }
  const lockstep::cpu::SamplingBatch batch{
      static_cast<const float*>(logits.data()), R, logits.shape(1),
      row_stride(logits),
      static_cast<const float*>(temperature.data()),
      static_cast<const std::int64_t*>(top_k.data()),
      static_cast<const float*>(top_p.data()), static_cast<const float*>(min_p.data()),
      static_cast<const std::uint64_t*>(seeds.data()),
      static_cast<const std::int64_t*>(positions.data()),
      static_cast<const std::int64_t*>(branches.data())};
  auto* out = static_cast<std::int64_t*>(tokens_out.mutable_data());
  py::gil_scoped_release release;
  lockstep::cpu::sample_tokens(batch, out, logprobs_out);
}

void log_softmax(const py::object& logits_obj, const py::object& out_obj) {
  const py::array logits = array_arg("logits", logits_obj, py::dtype::of<float>(), "float32", 2, true);
  py::array out = array_arg("out", out_obj, py::dtype::of<float>(), "float32", 2);
  expect_shape("out", out, {logits.shape(0), logits.shape(1)}, "(rows, vocab) of logits");
  expect_writeable("out", out);
  expect_apart("out", out, "logits", logits);
  const py::ssize_t R = logits.shape(0);
  const float* x = static_cast<const float*>(logits.data());
  const std::int64_t stride = row_stride(logits);
  float* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  lockstep::cpu::log_softmax_rows(x, R, logits.shape(1), stride, o);
}

// ---- Block allocator: the prefix cache's token arrays ----

std::pair<BlockAllocator::Handle, std::int64_t> new_sequence_cached(BlockAllocator& a,
                                                                    const py::object& tokens_obj) {
  const py::array tokens =
      array_arg("tokens", tokens_obj, py::dtype::of<std::int64_t>(), "int64", 1);
  return a.new_sequence_cached(static_cast<const std::int64_t*>(tokens.data()), tokens.shape(0));
}

void publish(BlockAllocator& a, BlockAllocator::Handle h, const py::object& tokens_obj,
             std::int64_t num_computed, std::int64_t first) {
  const py::array tokens =
      array_arg("tokens", tokens_obj, py::dtype::of<std::int64_t>(), "int64", 1);
  a.publish(h, static_cast<const std::int64_t*>(tokens.data()), tokens.shape(0), num_computed, first);
}

std::pair<std::int64_t, std::vector<BlockAllocator::Copy>> append_one_each(
    BlockAllocator& a, const py::object& handles_obj) {
  const py::array handles =
      array_arg("handles", handles_obj, py::dtype::of<std::int64_t>(), "int64", 1);
  std::vector<BlockAllocator::Copy> copies;
  const std::int64_t grown =
      a.append_one_each(static_cast<const BlockAllocator::Handle*>(handles.data()), handles.shape(0), copies);
  return {grown, std::move(copies)};
}

// ---- Step planner: the caller's arrays, checked once and held for the planner's life. ----

class PyStepPlanner {
 public:
  PyStepPlanner(const BlockAllocator& allocator, const py::object& token_ids,
                const py::object& positions, const py::object& slot_mapping,
                const py::object& block_tables, const py::object& seq_lens,
                const py::object& query_start, std::int64_t null_block)
      : arrays_{array_arg("token_ids", token_ids, i64(), "int64", 1),
                array_arg("positions", positions, i64(), "int64", 1),
                array_arg("slot_mapping", slot_mapping, i64(), "int64", 1),
                array_arg("block_tables", block_tables, i32(), "int32", 2),
                array_arg("seq_lens", seq_lens, i32(), "int32", 1),
                array_arg("query_start", query_start, i32(), "int32", 1)},
        planner_(allocator, step_arrays(), null_block) {}

  void plan(const py::object& handles_obj, const py::object& starts_obj,
            const py::object& counts_obj, const py::object& tokens_obj,
            std::int64_t num_seqs_padded, std::int64_t num_tokens_padded) {
    const py::array handles = array_arg("handles", handles_obj, i64(), "int64", 1);
    const py::array starts = array_arg("starts", starts_obj, i64(), "int64", 1);
    const py::array counts = array_arg("counts", counts_obj, i64(), "int64", 1);
    const py::array tokens = array_arg("tokens", tokens_obj, i64(), "int64", 1);
    const py::ssize_t S = handles.shape(0);
    expect_shape("starts", starts, {S}, "(sequences in handles,)");
    expect_shape("counts", counts, {S}, "(sequences in handles,)");
    planner_.plan(data(handles), data(starts), data(counts), S, data(tokens), tokens.shape(0),
                  num_seqs_padded, num_tokens_padded);
  }

 private:
  static py::dtype i64() { return py::dtype::of<std::int64_t>(); }
  static py::dtype i32() { return py::dtype::of<std::int32_t>(); }
  static const std::int64_t* data(const py::array& a) {
    return static_cast<const std::int64_t*>(a.data());
  }

  // Checks the shapes against token_ids' and block_tables' (the capacities), then points the
  // planner at the arrays; runs once, in the constructor.
  lockstep::StepArrays step_arrays() {
    const char* names[] = {"token_ids", "positions", "slot_mapping", "block_tables", "seq_lens",
                           "query_start"};
    auto& [token_ids, positions, slot_mapping, block_tables, seq_lens, query_start] = arrays_;
    const py::ssize_t max_tokens = token_ids.shape(0), max_seqs = block_tables.shape(0);
    expect_shape("positions", positions, {max_tokens}, "token_ids' shape");
    expect_shape("slot_mapping", slot_mapping, {max_tokens}, "token_ids' shape");
    expect_shape("seq_lens", seq_lens, {max_seqs}, "(rows of block_tables,)");
    expect_shape("query_start", query_start, {max_seqs + 1}, "(rows of block_tables + 1,)");
    for (std::size_t i = 0; i < std::size(arrays_); ++i) {
      expect_writeable(names[i], arrays_[i]);
      for (std::size_t j = 0; j < i; ++j) expect_apart(names[i], arrays_[i], names[j], arrays_[j]);
    }
    auto i64p = [](py::array& a) { return static_cast<std::int64_t*>(a.mutable_data()); };
    auto i32p = [](py::array& a) { return static_cast<std::int32_t*>(a.mutable_data()); };
    return {i64p(token_ids), i64p(positions), i64p(slot_mapping), i32p(block_tables),
            i32p(seq_lens), i32p(query_start), max_tokens, max_seqs, block_tables.shape(1)};
  }

  py::array arrays_[6];  // holding them keeps the memory the planner writes alive
  lockstep::StepPlanner planner_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lockstep's native core: the KV block allocator and the CPU kernels of a forward step.";

  py::register_exception<lockstep::ArenaExhausted>(m, "ArenaExhaustedError",
                                                   PyExc_RuntimeError);

  py::class_<BlockAllocator>(m, "BlockAllocator", R"doc(
Hands out the blocks of a fixed KV arena to sequences.

Forks share blocks by refcount in O(1); a shared, partial tail block is copied before it is
written (append returns the copies to do). Allocation is deterministic: a fresh allocator
hands out 0, 1, 2, ...; freed blocks are reused last-freed-first; truncate and free release
from the tail backwards.

With prefix_cache=True, full blocks that publish() registers are shared across requests:
new_sequence_cached(prompt) adopts the longest registered chain matching the prompt. A cached
block nobody holds stays cached until an append needs it (least recently released first);
num_free_blocks() counts it as free.
)doc")
      .def(py::init<std::int64_t, std::int64_t, bool>(), py::arg("num_blocks"),
           py::arg("block_size"), py::arg("prefix_cache") = false)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def_property_readonly("prefix_cache", &BlockAllocator::prefix_cache)
      .def("new_sequence", &BlockAllocator::new_sequence,
           "Handle of a new, empty sequence (0 tokens, 0 blocks).")
      .def("new_sequence_cached", &new_sequence_cached, py::arg("tokens"), R"doc(
(handle, cached_tokens): a new sequence holding the longest chain of published blocks that
matches tokens (numpy int64 [n]), at most (n - 1) // block_size blocks, so at least the last
token is left to compute. cached_tokens is a multiple of block_size; the caller appends the
rest. Without the prefix cache: (new_sequence(), 0).
)doc")
      .def("publish", &publish, py::arg("h"), py::arg("tokens"), py::arg("num_computed"), py::arg("first") = 0,
           R"doc(
Registers h's full blocks that lie within its first num_computed tokens (their KV written)
for later requests to adopt; tokens: numpy int64, h's tokens from token `first` on (up to at
least num_computed). Publishing each block as it completes, pass the tokens from the first
block not yet published: a block before `first` that is not published yet cannot be keyed,
and neither it nor any after it is registered. A block whose tokens and parent another block
already holds stays unshared. Cheap to repeat: only blocks not yet published are looked at.
Does nothing without the prefix cache.
)doc")
      .def("clear_prefix_cache", &BlockAllocator::clear_prefix_cache,
           "Unregisters every cached block; those no sequence holds return to the free list.")
      .def("num_cached_blocks", &BlockAllocator::num_cached_blocks,
           "Blocks registered in the prefix cache, held by a sequence or not.")
      .def("prefix_queries", &BlockAllocator::prefix_queries,
           "Prompt tokens new_sequence_cached could have matched ((n - 1) // block_size blocks each).")
      .def("prefix_hits", &BlockAllocator::prefix_hits,
           "Prompt tokens new_sequence_cached matched.")
      .def("blocks_needed", &BlockAllocator::blocks_needed, py::arg("h"), py::arg("n"),
           "Free blocks append(h, n) would take, counting a copy-on-write copy.")
      .def("append", &BlockAllocator::append, py::arg("h"), py::arg("n"),
           "Grow h by n token slots; returns [(src, dst), ...] copies to do before writing.\n"
           "Raises ArenaExhaustedError, changing nothing, if the arena is short.")
      .def("append_one_each", &append_one_each, py::arg("handles"), R"doc(
(grown, copies): grows each handle of handles (numpy int64 [n]) by one token slot, in order,
as append(h, 1) for each would, stopping before the first one the arena is too short for
(it and the rest are unchanged). grown: how many grew; copies: their [(src, dst), ...], to do
in that order before writing. Raises ValueError, changing nothing, for an unknown handle.
)doc")
      .def("fork", &BlockAllocator::fork, py::arg("h"),
           "New handle sharing all of h's blocks and tokens. O(1).")
      .def("truncate", &BlockAllocator::truncate, py::arg("h"), py::arg("n_tokens"),
           "Shrink h to n_tokens, releasing blocks it no longer needs, tail first.")
      .def("free", &BlockAllocator::free, py::arg("h"),
           "Release all of h's blocks, tail first, and forget the handle.")
      .def("num_tokens", &BlockAllocator::num_tokens, py::arg("h"))
      .def("num_published", &BlockAllocator::num_published, py::arg("h"),
           "Leading blocks of h that publish() has looked at: the next publish needs h's tokens from "
           "num_published(h) * block_size on (0 again after clear_prefix_cache()).")
      .def("block_table", &BlockAllocator::block_table, py::arg("h"),
           "h's blocks in order: ceil(num_tokens / block_size) of them.")
      .def("refcount", &BlockAllocator::refcount, py::arg("block"),
           "Number of live sequences whose block table holds this block.")
      .def("num_free_blocks", &BlockAllocator::num_free_blocks,
           "Blocks an append can take: free ones plus cached ones no sequence holds.")
      .def("num_sequences", &BlockAllocator::num_sequences)
      .def("__repr__", [](const BlockAllocator& a) {
        return "BlockAllocator(num_blocks=" + std::to_string(a.num_blocks()) +
               ", block_size=" + std::to_string(a.block_size()) +
               (a.prefix_cache() ? ", cached=" + std::to_string(a.num_cached_blocks()) : "") +
               ", free=" + std::to_string(a.num_free_blocks()) +
               ", sequences=" + std::to_string(a.num_sequences()) + ")";
      });

  py::class_<PyStepPlanner>(m, "StepPlanner", R"doc(
Fills one step's preallocated metadata arrays for the whole batch in one call.

The arrays are allocated once by the caller (the largest bucket's size) and held here:
token_ids, positions, slot_mapping: int64 [max_tokens]; block_tables: int32 [max_seqs, W];
seq_lens: int32 [max_seqs]; query_start: int32 [max_seqs + 1]. null_block is the arena's
scratch block for padding (>= allocator.num_blocks; allocator.num_blocks is the usual one).
)doc")
      .def(py::init<const BlockAllocator&, const py::object&, const py::object&,
                    const py::object&, const py::object&, const py::object&, const py::object&,
                    std::int64_t>(),
           py::arg("allocator"), py::arg("token_ids"), py::arg("positions"),
           py::arg("slot_mapping"), py::arg("block_tables"), py::arg("seq_lens"),
           py::arg("query_start"), py::arg("null_block"), py::keep_alive<1, 2>())
      .def("plan", &PyStepPlanner::plan, py::arg("handles"), py::arg("starts"),
           py::arg("counts"), py::arg("tokens"), py::arg("num_seqs_padded"),
           py::arg("num_tokens_padded"), R"doc(
Writes the step for S sequences (handles, starts, counts: int64 [S]; tokens: int64
[sum(counts)]), padded to num_seqs_padded sequences and num_tokens_padded rows.

Sequence s owns rows query_start[s] .. + counts[s] - 1 (consecutive, in order), at
positions starts[s] + i, with their cache slots in slot_mapping; block_tables[s] starts with
its blocks for its first seq_lens[s] = starts[s] + counts[s] tokens, which the allocator must
hold. Each padded sequence owns one row (token 0, position 0, the null block's first slot,
seq_len 1, block_tables[s, 0] = null_block); rows after those are padding in no sequence.
Malformed arguments raise ValueError naming the argument, with nothing written.
)doc");

  m.def("quant_matmul", &quant_matmul, py::arg("x"), py::arg("w"), py::arg("qtype"),
        py::arg("out"), py::arg("isa") = "auto", R"doc(
out[m, n] = sum_k x[m, k] * W[n, k], reading W's GGUF blocks as stored; written into out.

x: float32 [M, K]; w: uint8 [N, row_bytes], one row per output (K/32 blocks for Q8_0,
Q4_0, Q4_1; K elements for F32, F16); qtype: "F32", "F16", "Q8_0", "Q4_0" or "Q4_1";
out: float32 [M, N]. All C-contiguous numpy arrays (CPU torch tensors via .numpy()).
isa: "auto", "avx512", "avx2" or "scalar". Every output element is reduced in one fixed order, so
its bits do not depend on M, the thread count or isa. Runs without the GIL. Malformed
arguments raise ValueError naming the argument.
)doc");
  m.def("dequantize_rows", &dequantize_rows, py::arg("w"), py::arg("qtype"), py::arg("ids"),
        py::arg("out"), R"doc(
out[m, :] = row ids[m] of W decoded to float32: the embedding lookup on GGUF blocks.

w: uint8 [N, row_bytes] as for quant_matmul; qtype: "F32", "F16", "Q8_0", "Q4_0" or "Q4_1";
ids: int64 [M]; out: float32 [M, K]. The values are exactly those quant_matmul multiplies by.
An id outside [0, N) or a malformed argument raises ValueError naming it, before any write.
)doc");
  m.def("set_num_threads", [](int n) { lockstep::cpu::ThreadPool::instance().set_num_threads(n); },
        py::arg("n"), "Threads quant_matmul and paged_attention use, the caller included (1 <= n <= 1024).");
  m.def("get_num_threads", [] { return lockstep::cpu::ThreadPool::instance().num_threads(); },
        "Threads quant_matmul and paged_attention use; starts as the CPUs this process may run on.");
  m.def("cpu_features", [] {
    const lockstep::cpu::CpuFeatures f = lockstep::cpu::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512"] = f.avx512;
    d["auto_isa"] = lockstep::cpu::isa_name(lockstep::cpu::auto_isa());
    return d;
  }, "{'avx2', 'fma', 'f16c', 'avx512' (F, BW and VL): bool, 'auto_isa': the isa that isa='auto' runs}.");

  m.def("sample_tokens", &sample_tokens, py::arg("logits"), py::arg("temperature"),
        py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("seeds"),
        py::arg("positions"), py::arg("branches"), py::arg("tokens_out"),
        py::arg("logprobs_out") = py::none(), R"doc(
One token per row of logits, written into tokens_out: the rule of runtime.sampler.sample_row
(greedy where temperature <= 0; else temperature, top-k, top-p, min-p and an inverse-CDF pick
with uniform(seed, position, branch)) without sorting the vocabulary (cpp/cpu/sampling.h).
With logprobs_out (float32 [R]), also each chosen token's log-probability under the raw
logits, summed in one fixed order per row (NaN logits count as -inf).

logits: float32 [R, V], rows C-contiguous, any row stride; temperature, top_p, min_p: float32
[R]; top_k, positions, branches: int64 [R]; seeds: uint64 [R]; tokens_out: int64 [R]. Each
row is computed by one thread from its own data, so a token does not depend on the batch.
Runs without the GIL; malformed arguments raise ValueError naming the argument.
)doc");
  m.def("log_softmax", &log_softmax, py::arg("logits"), py::arg("out"), R"doc(
out[r] = log softmax of logits[r] by the C++ sampler's own rule and sums, so out[r, t] is bit
for bit the logprob sample_tokens(logprobs_out=...) gives token t (NaN logits count as -inf).

logits: float32 [R, V], rows C-contiguous, any row stride; out: float32 [R, V], C-contiguous.
Each row is computed by one thread. Runs without the GIL; malformed arguments raise ValueError.
)doc");
  m.def("philox_uniform", &lockstep::cpu::philox_uniform, py::arg("seed"), py::arg("position"),
        py::arg("branch"),
        "runtime.sampler.uniform(seed, position, branch) as the C++ sampler draws it.");
  // ---- CPU step ops ----
  m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out"),
        R"doc(
out[t] = weight * (x[t] / sqrt(mean(x[t]^2) + eps)), each row reduced in one fixed order.

x, out: float32 [T, H] (out may be x); weight: float32 [H]. C-contiguous numpy arrays.
Runs without the GIL; malformed arguments raise ValueError naming the argument.
)doc");
  m.def("add_rms_norm", &add_rms_norm, py::arg("x"), py::arg("residual"), py::arg("weight"),
        py::arg("eps"), py::arg("out"), R"doc(
residual += x, then out = rms_norm(residual, weight, eps): a residual add and the next norm.

x, residual, out: float32 [T, H], pairwise apart in memory; weight: float32 [H].
)doc");
  m.def("rope_and_cache", &rope_and_cache, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cos"), py::arg("sin"), py::arg("positions"), py::arg("slots"),
        py::arg("k_cache"), py::arg("v_cache"), R"doc(
Rotate-half RoPE of q [T, Hq, D] and k [T, Hkv, D] in place at angles cos/sin[positions[t]]
(tables float32 [P, D/2]), then k_cache[slots[t]] = k[t], v_cache[slots[t]] = v[t]
(caches float32 [num_slots, Hkv, D], C-contiguous). q, k, v may have any row stride (column
slices of one qkv matmul output); positions, slots: int64 [T], all checked before any write.
)doc");
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("query_start"), py::arg("seq_lens"),
        py::arg("block_size"), py::arg("scale"), py::arg("out"), R"doc(
Causal GQA attention of each sequence's new queries over its context in the paged KV cache.

q: float32 [T, Hq, D], any row stride; k_cache, v_cache: float32 [num_slots, Hkv, D];
block_tables: int32 [S, W]; query_start: int32 [S + 1]; seq_lens: int32 [S] (the arrays
StepPlanner fills); out: float32 [T, Hq * D]. Sequence s owns query rows
[query_start[s], query_start[s + 1]) (0 rows allowed) and attends causally over its first
seq_lens[s] positions, position j at slot block_tables[s, j // block_size] * block_size +
j % block_size; its last query sits at position seq_lens[s] - 1. Rows outside every sequence
are not written. Each (sequence, head) is computed whole by one thread in a fixed order
(cpp/cpu/cpu_ops.cpp), so results do not depend on the other sequences or the thread count.
)doc");
}
