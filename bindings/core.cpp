// lockstep._core: the host-side runtime core, exposed to Python.
//
// The C++ classes know nothing of Python; this file only names things. C++
// std::invalid_argument surfaces as ValueError (pybind11's built-in translation) and
// lockstep::ArenaExhausted as ArenaExhaustedError, a RuntimeError subclass the scheduler
// catches to preempt or queue.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "block_allocator.h"

namespace py = pybind11;
using lockstep::BlockAllocator;

PYBIND11_MODULE(_core, m) {
  m.doc() = "lockstep's native core: the KV block allocator.";

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
}
