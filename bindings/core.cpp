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
#include <string>

#include "block_allocator.h"
#include "cpu/quant_matmul.h"
#include "cpu/thread_pool.h"

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

// The numpy array behind `obj`, which must be a 2-D, C-contiguous array of `dtype`.
py::array matrix_arg(const char* name, const py::object& obj, const py::dtype& dtype,
                     const char* dtype_name) {
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
  if (a.ndim() != 2) {
    throw py::value_error(std::string(name) + ": expected a 2-D array, got shape " +
                          shape_of(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) +
                          ": must be C-contiguous (use numpy.ascontiguousarray or "
                          "tensor.contiguous())");
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
  const py::array x = matrix_arg("x", x_obj, py::dtype::of<float>(), "float32");
  const py::array w = matrix_arg("w", w_obj, py::dtype::of<std::uint8_t>(), "uint8");
  py::array out = matrix_arg("out", out_obj, py::dtype::of<float>(), "float32");
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

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "lockstep's native core: the KV block allocator and the CPU matmul kernels.";

  py::register_exception<lockstep::ArenaExhausted>(m, "ArenaExhaustedError",
                                                   PyExc_RuntimeError);

  py::class_<BlockAllocator>(m, "BlockAllocator", R"doc(
Hands out the blocks of a fixed KV arena to sequences.

Forks share blocks by refcount in O(1); a shared, partial tail block is copied before it is
written (append returns the copies to do). Allocation is deterministic: a fresh allocator
hands out 0, 1, 2, ...; freed blocks are reused last-freed-first; truncate and free release
from the tail backwards.
)doc")
      .def(py::init<std::int64_t, std::int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def_property_readonly("block_size", &BlockAllocator::block_size)
      .def("new_sequence", &BlockAllocator::new_sequence,
           "Handle of a new, empty sequence (0 tokens, 0 blocks).")
      .def("blocks_needed", &BlockAllocator::blocks_needed, py::arg("h"), py::arg("n"),
           "Free blocks append(h, n) would take, counting a copy-on-write copy.")
      .def("append", &BlockAllocator::append, py::arg("h"), py::arg("n"),
           "Grow h by n token slots; returns [(src, dst), ...] copies to do before writing.\n"
           "Raises ArenaExhaustedError, changing nothing, if the arena is short.")
      .def("fork", &BlockAllocator::fork, py::arg("h"),
           "New handle sharing all of h's blocks and tokens. O(1).")
      .def("truncate", &BlockAllocator::truncate, py::arg("h"), py::arg("n_tokens"),
           "Shrink h to n_tokens, releasing blocks it no longer needs, tail first.")
      .def("free", &BlockAllocator::free, py::arg("h"),
           "Release all of h's blocks, tail first, and forget the handle.")
      .def("num_tokens", &BlockAllocator::num_tokens, py::arg("h"))
      .def("block_table", &BlockAllocator::block_table, py::arg("h"),
           "h's blocks in order: ceil(num_tokens / block_size) of them.")
      .def("refcount", &BlockAllocator::refcount, py::arg("block"),
           "Number of live sequences whose block table holds this block.")
      .def("num_free_blocks", &BlockAllocator::num_free_blocks)
      .def("num_sequences", &BlockAllocator::num_sequences)
      .def("__repr__", [](const BlockAllocator& a) {
        return "BlockAllocator(num_blocks=" + std::to_string(a.num_blocks()) +
               ", block_size=" + std::to_string(a.block_size()) +
               ", free=" + std::to_string(a.num_free_blocks()) +
               ", sequences=" + std::to_string(a.num_sequences()) + ")";
      });

  m.def("quant_matmul", &quant_matmul, py::arg("x"), py::arg("w"), py::arg("qtype"),
        py::arg("out"), py::arg("isa") = "auto", R"doc(
out[m, n] = sum_k x[m, k] * W[n, k], reading W's GGUF blocks as stored; written into out.

x: float32 [M, K]; w: uint8 [N, row_bytes], one row per output (K/32 blocks for Q8_0,
Q4_0, Q4_1; K elements for F32, F16); qtype: "F32", "F16", "Q8_0", "Q4_0" or "Q4_1";
out: float32 [M, N]. All C-contiguous numpy arrays (CPU torch tensors via .numpy()).
isa: "auto", "avx2" or "scalar". Every output element is reduced in one fixed order, so
its bits do not depend on M, the thread count or isa. Runs without the GIL. Malformed
arguments raise ValueError naming the argument.
)doc");
  m.def("set_num_threads", [](int n) { lockstep::cpu::ThreadPool::instance().set_num_threads(n); },
        py::arg("n"), "Threads quant_matmul uses, the caller included (1 <= n <= 1024).");
  m.def("get_num_threads", [] { return lockstep::cpu::ThreadPool::instance().num_threads(); },
        "Threads quant_matmul uses; starts as the CPUs this process may run on.");
  m.def("cpu_features", [] {
    const lockstep::cpu::CpuFeatures f = lockstep::cpu::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["auto_isa"] = lockstep::cpu::isa_name(lockstep::cpu::auto_isa());
    return d;
  }, "{'avx2', 'fma', 'f16c': bool, 'auto_isa': the isa that isa='auto' runs}.");
}
