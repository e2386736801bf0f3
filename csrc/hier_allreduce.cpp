// Native executor of the 2D hierarchical allreduce schedule (gnnscale/comm/schedule.py).
//
// Python computes the step list of ONE segment (so Python and C++ run the same schedule and add
// the same numbers in the same order); this file runs it on K equal segments of the buffer
// concurrently (run_pipelined for gloo, run_ordered for NCCL). Point-to-point messages carry
// the segment index as their tag, so concurrent segments on the same ring and peer never mix
// (gloo matches by tag; NCCL matches in posting order, which run_ordered keeps identical on
// every rank).
//
// The process groups are the c10d objects torch.distributed already holds (ProcessGroup from
// new_group, or a raw Backend such as ProcessGroupGloo); this code only calls their send/recv.
//
// A lost peer must end the call, never hang it: every wait gets the job's timeout explicitly
// (Work::wait without one falls back to the group's own, 30 min for a group created without a
// timeout), and when one segment fails the others abort their pending messages and stop.

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace {

// Column layout of the int64 [steps, 8] tensor built by gnnscale.comm.native.
enum Col { RING = 0, SEND_TO, RECV_FROM, SEND_OFF, RECV_OFF, LENGTH, REDUCE, SEND_FIRST, NCOLS };

// One step of segment k: post its send and receive, return the works and where a reduce adds.
template <class PG>
struct Poster {
  at::Tensor buf;
  const int64_t* st;
  int64_t seg_len;
  const std::vector<std::optional<c10::intrusive_ptr<PG>>>& groups;

  struct Posted {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    at::Tensor recv_into, add_to;  // add_to defined only for reduce steps
  };

  Posted post(int64_t k, int64_t step, const at::Tensor& tmp) const {
    const int64_t* row = st + step * NCOLS;
    const int64_t base = k * seg_len, len = row[LENGTH];
    auto& pg = *groups[row[RING]];
    std::vector<at::Tensor> out{buf.narrow(0, base + row[SEND_OFF], len)};
    at::Tensor dst = buf.narrow(0, base + row[RECV_OFF], len);
    std::vector<at::Tensor> into{row[REDUCE] ? tmp.narrow(0, 0, len) : dst};
    const int tag = static_cast<int>(k);
    Posted p;
    if (row[SEND_FIRST]) {
      p.works.push_back(pg->send(out, static_cast<int>(row[SEND_TO]), tag));
      p.works.push_back(pg->recv(into, static_cast<int>(row[RECV_FROM]), tag));
    } else {
      p.works.push_back(pg->recv(into, static_cast<int>(row[RECV_FROM]), tag));
      p.works.push_back(pg->send(out, static_cast<int>(row[SEND_TO]), tag));
    }
    p.recv_into = into[0];
    p.add_to = row[REDUCE] ? dst : at::Tensor();
    return p;
  }

  // False when a wait was aborted (another segment failed); throws when a wait failed.
  static bool finish(Posted& p, std::chrono::milliseconds timeout) {
    for (auto& w : p.works)
      if (!w->wait(timeout)) return false;
    if (p.add_to.defined()) p.add_to.add_(p.recv_into);
    return true;
  }
};

// Unblock waits of messages that will never complete (Work::abort is best effort: a backend
// without it leaves the wait to its timeout).
inline void abort_all(const std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  for (auto& w : works) {
    try {
      w->abort();
    } catch (...) {
    }
  }
}

// Ordered mode (NCCL, which matches point-to-point messages in posting order): segments are
// served round-robin, every rank posting in (step, segment) order; a segment's next step is
// posted when its current one completes, so phases overlap only at their boundaries.
template <class PG>
void run_ordered(const Poster<PG>& poster, int64_t n, int64_t segments,
                 const std::vector<at::Tensor>& tmp, std::chrono::milliseconds timeout) {
  using Posted = typename Poster<PG>::Posted;
  std::vector<Posted> cur(segments);
  try {
    for (int64_t k = 0; k < segments; ++k) cur[k] = poster.post(k, 0, tmp[k]);
    for (int64_t step = 0; step < n; ++step) {
      for (int64_t k = 0; k < segments; ++k) {
        TORCH_CHECK(Poster<PG>::finish(cur[k], timeout), "a message of segment ", k,
                    " was aborted");
        if (step + 1 < n) cur[k] = poster.post(k, step + 1, tmp[k]);
      }
    }
  } catch (...) {
    for (auto& p : cur) abort_all(p.works);  // no message outlives the call
    throw;
  }
}

// Pipelined mode (gloo, which matches messages by tag = segment): one thread per segment runs
// the segment's steps, and segment k starts a phase (a run of steps on one ring) only after
// segment k-1 has finished it. So segments flow through the phases in order like a pipeline:
// while segment k crosses the slow inter-server link, segment k+1 reduces inside the server.
template <class PG>
void run_pipelined(const Poster<PG>& poster, int64_t n, int64_t segments,
                   const std::vector<at::Tensor>& tmp, std::chrono::milliseconds timeout) {
  std::vector<int64_t> phase_of(n);
  const int64_t* st = poster.st;
  for (int64_t j = 0, ph = 0; j < n; ++j) {
    if (j > 0 && (st[j * NCOLS + RING] != st[(j - 1) * NCOLS + RING] ||
                  st[j * NCOLS + REDUCE] != st[(j - 1) * NCOLS + REDUCE]))
      ++ph;
    phase_of[j] = ph;
  }
  std::vector<int64_t> finished(phase_of.back() + 1, 0);  // segments done with each phase
  // Works each segment is waiting on, so that the first failure can abort everyone else's:
  // without that, a segment blocked on a live peer (itself stuck) would wait out its own
  // timeout after the failure, and the next step's wait after that.
  std::vector<std::vector<c10::intrusive_ptr<c10d::Work>>> pending(segments);
  std::mutex m;
  std::condition_variable cv;
  bool failed = false;
  std::exception_ptr error;
  auto run_segment = [&](int64_t k) {
    try {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t ph = phase_of[j];
        if (j == 0 || phase_of[j - 1] != ph) {  // entering a phase: wait for segment k-1
          std::unique_lock<std::mutex> lock(m);
          cv.wait(lock, [&] { return failed || finished[ph] >= k; });
          if (failed) return;
        }
        auto p = poster.post(k, j, tmp[k]);
        {
          std::lock_guard<std::mutex> lock(m);
          if (failed) {  // posted after the others were aborted: abort it too
            abort_all(p.works);
            return;
          }
          pending[k] = p.works;
        }
        const bool done = Poster<PG>::finish(p, timeout);
        std::lock_guard<std::mutex> lock(m);
        pending[k].clear();
        if (!done || failed) return;  // aborted: the failing segment holds the error
        if (j + 1 == n || phase_of[j + 1] != ph) {
          finished[ph] = k + 1;
          cv.notify_all();
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(m);
      if (!error) error = std::current_exception();
      failed = true;
      for (auto& works : pending) abort_all(works);
      cv.notify_all();
    }
  };
  std::vector<std::thread> threads;
  for (int64_t k = 1; k < segments; ++k) threads.emplace_back(run_segment, k);
  run_segment(0);
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);
  TORCH_CHECK(!failed, "a segment was aborted without an error");  // unreachable
}

template <class PG>
void run_schedule(at::Tensor buf, at::Tensor steps, int64_t segments, int64_t seg_len,
                  std::vector<std::optional<c10::intrusive_ptr<PG>>> groups, bool ordered,
                  int64_t timeout_ms) {
  TORCH_CHECK(buf.dim() == 1 && buf.is_contiguous(), "buf must be a contiguous 1-D tensor");
  TORCH_CHECK(steps.dim() == 2 && steps.size(1) == NCOLS && steps.scalar_type() == at::kLong,
              "steps must be an int64 [n, 8] tensor");
  TORCH_CHECK(segments >= 1 && segments * seg_len == buf.numel(),
              "segments * seg_len must equal buf.numel()");
  TORCH_CHECK(groups.size() == 3, "expected 3 groups (server, axis0, axis1)");
  TORCH_CHECK(timeout_ms >= 0, "timeout_ms must be >= 0 (0: each group's own timeout)");
  const std::chrono::milliseconds timeout(timeout_ms);  // 0 is c10d::kNoTimeout
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
  // One receive buffer per segment: a reduce step adds only after its message is complete.
  std::vector<at::Tensor> tmp;
  for (int64_t k = 0; k < segments; ++k) tmp.push_back(at::empty({max_len}, buf.options()));
  Poster<PG> poster{buf, st, seg_len, groups};
  if (ordered || segments == 1)
    run_ordered(poster, n, segments, tmp, timeout);
  else
    run_pipelined(poster, n, segments, tmp, timeout);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gnnscale native 2D hierarchical allreduce executor";
  // Two bindings because torch 2.2 has two unrelated c10d classes with send/recv: ProcessGroup
  // (what dist.new_group returns) and Backend (ProcessGroupGloo/NCCL built directly).
  m.def("run_schedule_pg", &run_schedule<c10d::ProcessGroup>, py::arg("buf"), py::arg("steps"),
        py::arg("segments"), py::arg("seg_len"), py::arg("groups"), py::arg("ordered"),
        py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>());
  m.def("run_schedule_backend", &run_schedule<c10d::Backend>, py::arg("buf"), py::arg("steps"),
        py::arg("segments"), py::arg("seg_len"), py::arg("groups"), py::arg("ordered"),
        py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>());
}
