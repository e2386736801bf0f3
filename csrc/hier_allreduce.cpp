// Native executor of the 2D hierarchical allreduce schedule (gnnscale/comm/schedule.py).
//
// Python computes the step list of ONE segment (so Python and C++ run the same schedule and add
// the same numbers in the same order); this file runs it on K equal segments of the buffer
// concurrently (see run_schedule). Point-to-point messages carry the segment index as their
// tag, so concurrent segments on the same ring and peer never mix (gloo matches by tag; NCCL
// matches in posting order, which every rank keeps identical).
//
// The process groups are the c10d objects torch.distributed already holds (ProcessGroup from
// new_group, or a raw Backend such as ProcessGroupGloo); this code only calls their send/recv.

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <vector>

namespace {

// Column layout of the int64 [steps, 8] tensor built by gnnscale.comm.native.
enum Col { RING = 0, SEND_TO, RECV_FROM, SEND_OFF, RECV_OFF, LENGTH, REDUCE, SEND_FIRST, NCOLS };

template <class PG>
void run_schedule(at::Tensor buf, at::Tensor steps, int64_t segments, int64_t seg_len,
                  std::vector<std::optional<c10::intrusive_ptr<PG>>> groups) {
  TORCH_CHECK(buf.dim() == 1 && buf.is_contiguous(), "buf must be a contiguous 1-D tensor");
  TORCH_CHECK(steps.dim() == 2 && steps.size(1) == NCOLS && steps.scalar_type() == at::kLong,
              "steps must be an int64 [n, 8] tensor");
  TORCH_CHECK(segments >= 1 && segments * seg_len == buf.numel(),
              "segments * seg_len must equal buf.numel()");
  TORCH_CHECK(groups.size() == 3, "expected 3 groups (server, axis0, axis1)");
  auto s = steps.contiguous().cpu();
  const int64_t n = s.size(0);
  const int64_t* st = s.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t* row = st + j * NCOLS;
    TORCH_CHECK(row[RING] >= 0 && row[RING] < 3 && groups[row[RING]].has_value(),
                "step ", j, " uses ring ", row[RING], " which has no process group");
    TORCH_CHECK(row[SEND_OFF] >= 0 && row[RECV_OFF] >= 0 && row[LENGTH] >= 0 &&
                    row[SEND_OFF] + row[LENGTH] <= seg_len && row[RECV_OFF] + row[LENGTH] <= seg_len,
                "step ", j, " is outside the segment");
  }
  if (n == 0) return;
  int64_t max_len = 0;
  for (int64_t j = 0; j < n; ++j) max_len = std::max(max_len, st[j * NCOLS + LENGTH]);
  // One receive buffer per segment in flight: a reduce step cannot add into its chunk before
  // the message is complete.
  std::vector<at::Tensor> tmp;
  for (int64_t k = 0; k < segments; ++k) tmp.push_back(at::empty({max_len}, buf.options()));

  // Each segment is a small state machine: wait for ITS current step, add, post its next step.
  // Segments are served round-robin, so while one segment's add runs, the transfers of the
  // others proceed in the backend's threads (communication overlaps computation), and a
  // segment already runs its next step, often on the next ring, while the later segments
  // finish the current one (phases overlap at their boundaries). Every rank posts
  // in the same order ((step, segment) lexicographic), which NCCL's in-order matching needs,
  // and a step's message is posted by the peer when it finished the previous step of the same
  // segment, which comes earlier in that order: no deadlock.
  struct Active {
    int64_t step = 0;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    at::Tensor recv_into, add_to;  // add_to defined only for reduce steps
  };
  std::vector<Active> seg(segments);
  auto post = [&](int64_t k) {
    const int64_t* row = st + seg[k].step * NCOLS;
    const int64_t base = k * seg_len, len = row[LENGTH];
    auto& pg = *groups[row[RING]];
    std::vector<at::Tensor> out{buf.narrow(0, base + row[SEND_OFF], len)};
    at::Tensor dst = buf.narrow(0, base + row[RECV_OFF], len);
    std::vector<at::Tensor> into{row[REDUCE] ? tmp[k].narrow(0, 0, len) : dst};
    const int tag = static_cast<int>(k);
    seg[k].works.clear();
    if (row[SEND_FIRST]) {
      seg[k].works.push_back(pg->send(out, static_cast<int>(row[SEND_TO]), tag));
      seg[k].works.push_back(pg->recv(into, static_cast<int>(row[RECV_FROM]), tag));
    } else {
      seg[k].works.push_back(pg->recv(into, static_cast<int>(row[RECV_FROM]), tag));
      seg[k].works.push_back(pg->send(out, static_cast<int>(row[SEND_TO]), tag));
    }
    seg[k].recv_into = into[0];
    seg[k].add_to = row[REDUCE] ? dst : at::Tensor();
  };
  for (int64_t k = 0; k < segments; ++k) post(k);
  for (int64_t step = 0; step < n; ++step) {
    for (int64_t k = 0; k < segments; ++k) {
      for (auto& w : seg[k].works) w->wait();
      if (seg[k].add_to.defined()) seg[k].add_to.add_(seg[k].recv_into);
      if (++seg[k].step < n) post(k);
    }
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gnnscale native 2D hierarchical allreduce executor";
  // Two bindings because torch 2.2 has two unrelated c10d classes with send/recv: ProcessGroup
  // (what dist.new_group returns) and Backend (ProcessGroupGloo/NCCL built directly).
  m.def("run_schedule_pg", &run_schedule<c10d::ProcessGroup>, py::arg("buf"), py::arg("steps"),
        py::arg("segments"), py::arg("seg_len"), py::arg("groups"),
        py::call_guard<py::gil_scoped_release>());
  m.def("run_schedule_backend", &run_schedule<c10d::Backend>, py::arg("buf"), py::arg("steps"),
        py::arg("segments"), py::arg("seg_len"), py::arg("groups"),
        py::call_guard<py::gil_scoped_release>());
}
