// CUDA graphs for the resident store's scoring round, and its side-stream prefetch copies
// (src/runtime/scoring/graphs.rs).
//
// Why C++: tch 0.24 binds no CUDA graphs or streams, and an eager round is launch-bound on a
// GPU (a gather and three batched layers: 190-260 us, against 41-60 us replayed as a graph,
// measured on an H200). This file captures the round once per (probes, states) bucket and
// replays it; the Rust side owns the buckets, the inputs' host buffers and the readback.
// Compiled only with the `cuda-graphs` feature (make build-gpu), against a CUDA libtorch.
//
// Errors never cross the boundary as exceptions: each function catches, writes the message
// into `err` and returns a failure value. The guards are c10's device-generic ones, not
// CUDAGuard: CUDAGuard's inline implementation would call the CUDA runtime from this object,
// making the binary need libcudart on its own library path rather than through libtorch_cuda.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdio>
#include <exception>
#include <optional>

namespace {

// One captured round: its static inputs (written before each replay) and output.
struct Graph {
  at::cuda::CUDAGraph graph;
  at::Tensor idx;  // [n] int64: store rows
  at::Tensor x;    // [b, D] f32: hidden states
  at::Tensor out;  // [n * b] f32: logits, probe-major
};

void fail(char* err, size_t len, const char* what) {
  if (err != nullptr && len > 0) std::snprintf(err, len, "%s", what);
}

// The round, as `TorchArena::score_slots` runs it eagerly: gather the rows, then
// relu(W1 x + b1), relu(W2 a1 + b2), W3 a2 + b3, in the store's compute dtype.
at::Tensor round(const at::Tensor* w[6], const at::Tensor& idx, const at::Tensor& x) {
  // w: b1, w1, b2, w2, b3, w3 (pack layout order).
  const auto& b1 = *w[0];
  const auto& w1 = *w[1];
  const auto& b2 = *w[2];
  const auto& w2 = *w[3];
  const auto& b3 = *w[4];
  const auto& w3 = *w[5];
  const int64_t n = idx.size(0), b = x.size(0), d = w1.size(2), h1 = w1.size(1);
  auto g = [&](const at::Tensor& t) { return at::index_select(t, 0, idx); };
  auto xt = x.to(w1.scalar_type()).t();
  auto a1 = at::matmul(g(w1).view({n * h1, d}), xt);
  a1 = at::relu(a1 + g(b1).view({n * h1, 1})).view({n, h1, b});
  auto a2 = at::relu(at::baddbmm(g(b2), g(w2), a1));
  return at::baddbmm(g(b3), g(w3), a2).view({-1}).to(at::kFloat);
}

c10::MempoolId_t shared_pool() {
  // One memory pool for every graph: each replay recomputes all of its intermediates from
  // its static inputs and its output is read back before the next replay, so graphs may
  // reuse each other's intermediate memory in any order. Static inputs and outputs stay
  // alive with their graph, so no capture is handed their memory.
  static c10::MempoolId_t pool = at::cuda::graph_pool_handle();
  return pool;
}

}  // namespace

extern "C" {

// Captures the round for `n` rows and `b` hidden states over the store tensors `w` (b1, w1,
// b2, w2, b3, w3, on one CUDA device). Returns the graph, or null with `err` set. `*out`
// gets a new tensor (the caller frees it, with tch) that each replay overwrites.
void* pc_graph_capture(const at::Tensor** w, int64_t n, int64_t b, at::Tensor** out, char* err, size_t err_len) {
  try {
    const auto& w1 = *w[1];
    c10::DeviceGuard device(w1.device());
    auto* g = new Graph();
    g->idx = at::zeros({n}, w1.options().dtype(at::kLong));
    g->x = at::zeros({b, w1.size(2)}, w1.options().dtype(at::kFloat));
    // Capture on a side stream, after what the current stream has queued; warm up there first
    // (cuBLAS handles and workspaces are per stream and must exist before capture).
    auto current = c10::cuda::getCurrentCUDAStream();
    auto side = c10::cuda::getStreamFromPool();
    current.synchronize();
    {
      c10::StreamGuard on(side);
      for (int i = 0; i < 2; i++) round(w, g->idx, g->x);
      side.synchronize();
      // Thread-local: a model running on other threads of the process is not disturbed.
      g->graph.capture_begin(shared_pool(), cudaStreamCaptureModeThreadLocal);
      try {
        g->out = round(w, g->idx, g->x);
        g->graph.capture_end();
      } catch (...) {
        // End the capture before anything else runs on this thread.
        try {
          g->graph.capture_end();
        } catch (...) {
        }
        throw;
      }
    }
    side.synchronize();
    *out = new at::Tensor(g->out);
    return g;
  } catch (const std::exception& e) {
    fail(err, err_len, e.what());
    return nullptr;
  }
}

// Replays `graph` on the current stream for `n` rows and `b` hidden states: copies them in from
// `idx_host` (int64, at least n) and `x_host` (f32, at least b * D, flat: the pinned host
// buffer, or states that already lie on the device) without waiting, then launches the graph. The caller reads the output back (which waits).
// Rows and states past n and b keep earlier values: their logits are not read. 0, or -1 with
// `err` set.
int pc_graph_replay(void* graph, const at::Tensor* idx_host, const at::Tensor* x_host, int64_t n, int64_t b,
                    char* err, size_t err_len) {
  try {
    auto* g = static_cast<Graph*>(graph);
    c10::DeviceGuard device(g->idx.device());
    const int64_t d = g->x.size(1);
    g->idx.narrow(0, 0, n).copy_(idx_host->narrow(0, 0, n), /*non_blocking=*/true);
    g->x.narrow(0, 0, b).copy_(x_host->narrow(0, 0, b * d).view({b, d}), /*non_blocking=*/true);
    g->graph.replay();
    return 0;
  } catch (const std::exception& e) {
    fail(err, err_len, e.what());
    return -1;
  }
}

void pc_graph_free(void* graph) {
  try {
    delete static_cast<Graph*>(graph);
  } catch (...) {
  }
}

// Side-stream copies (the store's prefetch, graphs.rs `SideCopy`): between `pc_side_begin`
// and `pc_side_end` this thread's current stream is a pool stream, so the Rust side's ordinary
// tch calls (a non-blocking host-to-device copy, the scatter into store rows) queue there
// while the current stream goes on scoring. `pc_side_end` records an event after them;
// `pc_side_order` makes the current stream wait for it on the device (the host does not
// wait), `pc_side_done` asks whether it has passed. c10's device-generic Event and guards,
// for the reason given at the top.
struct Side {
  c10::Stream stream;
  std::optional<c10::StreamGuard> on;
  c10::Event done{c10::DeviceType::CUDA};
};

// Starts a side copy on CUDA device `device`: after what the current stream has queued (the
// rows it overwrites may still be read there). Returns the copy, or null with `err` set.
void* pc_side_begin(int64_t device, char* err, size_t err_len) {
  try {
    const auto index = static_cast<c10::DeviceIndex>(device);
    auto current = c10::cuda::getCurrentCUDAStream(index).unwrap();
    auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index).unwrap();
    c10::Event queued(c10::DeviceType::CUDA);
    queued.record(current);
    queued.block(side);
    auto* s = new Side{side};
    s->on.emplace(side);
    return s;
  } catch (const std::exception& e) {
    fail(err, err_len, e.what());
    return nullptr;
  }
}

// Ends the side copy's queueing: records its event and puts this thread's stream back.
int pc_side_end(void* copy, char* err, size_t err_len) {
  auto* s = static_cast<Side*>(copy);
  try {
    s->done.record(s->stream);
    s->on.reset();
    return 0;
  } catch (const std::exception& e) {
    s->on.reset();
    fail(err, err_len, e.what());
    return -1;
  }
}

// 1 if everything the side copy queued has run, 0 if not yet, -1 with `err` set.
int pc_side_done(void* copy, char* err, size_t err_len) {
  try {
    return static_cast<Side*>(copy)->done.query() ? 1 : 0;
  } catch (const std::exception& e) {
    fail(err, err_len, e.what());
    return -1;
  }
}

// Makes the current stream (of the side copy's device) wait for the side copy, on the device.
int pc_side_order(void* copy, char* err, size_t err_len) {
  try {
    auto* s = static_cast<Side*>(copy);
    s->done.block(c10::cuda::getCurrentCUDAStream(s->stream.device_index()).unwrap());
    return 0;
  } catch (const std::exception& e) {
    fail(err, err_len, e.what());
    return -1;
  }
}

void pc_side_free(void* copy) {
  try {
    auto* s = static_cast<Side*>(copy);
    s->on.reset();
    delete s;
  } catch (...) {
  }
}

}  // extern "C"
