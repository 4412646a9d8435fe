// The simulated device's CUDA driver: the part of libcuda's C API that glimpse (through cudarc)
// calls, built as a libcuda.so that cudarc loads instead of the real one when its directory is
// first on LD_LIBRARY_PATH (scripts/sim-check.sh). The Rust code is the same as on a card.
//
// Semantics kept from the real driver, because the executor's correctness depends on them:
// - streams are queues: work runs when something waits for it (a stream, event or context
//   synchronisation, a synchronous copy, a free), in stream order, on the waiting thread; so a
//   host that reads a pinned buffer before synchronising sees stale bytes, as on a GPU;
// - copies from or to pageable host memory are staged at the call (as the driver does), copies
//   with pinned memory (cuMemHostAlloc) run when the stream reaches them;
// - kernel parameters are copied at launch (and at capture, for graphs);
// - stream capture records instead of running; synchronising, allocating or freeing, or using the
//   legacy stream from the capturing thread (any thread, in global mode) invalidates the capture
//   with CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, and pageable copies cannot be captured;
// - a graph replays the recorded operations with the recorded parameters;
// - launch checks: block size against __launch_bounds__, dynamic shared memory above 48 KiB only
//   after CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES was raised, every device range of a copy
//   or memset inside one allocation.
// A failed kernel (fault, barrier divergence, deadlock, bad warp mask) prints what happened on
// stderr and returns its error from the next call that waits on the stream.
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "sim.h"

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
};

namespace {

using gsim::KernelInfo;

// ---- objects behind the handles ------------------------------------------------------------

struct Function {
    const KernelInfo* k;
    unsigned max_dynamic_smem = 0;
};

struct Module {
    std::vector<std::unique_ptr<Function>> functions;
};

struct Event;
struct Stream;

struct Op {
    enum Kind { KERNEL, COPY, COPY2D, MEMSET, EVENT, HOST_FUNC } kind;
    // KERNEL
    Function* f = nullptr;
    gsim::LaunchConfig cfg{};
    std::vector<unsigned char> params;  // every parameter at its offset
    std::vector<size_t> offsets;
    // COPY / COPY2D: raw addresses; `staged` holds pageable source bytes copied at the call
    uintptr_t dst = 0, src = 0;
    size_t bytes = 0, rows = 1, dst_pitch = 0, src_pitch = 0;
    std::vector<unsigned char> staged;
    // MEMSET
    uint32_t value = 0;
    unsigned elem = 1;
    size_t count = 0;
    // EVENT
    Event* event = nullptr;
    // HOST_FUNC
    void (*fn)(void*) = nullptr;
    void* user = nullptr;
};

struct Graph {
    std::vector<Op> ops;
};

struct Capture {
    bool active = false;
    int mode = 0;  // 0 global, 1 thread local, 2 relaxed
    bool invalidated = false;
    std::thread::id owner;
    Graph* graph = nullptr;
};

struct Stream {
    std::mutex mu;  // held while the queue runs
    std::deque<Op> queue;
    Capture capture;
    int error = 0;  // first failure since the last wait
    std::string error_msg;
};

struct Event {
    Stream* stream = nullptr;
    bool pending = false;
    bool recorded = false;
    std::chrono::steady_clock::time_point when;
};

struct Context {
    int refs = 0;
};

Context g_ctx;
Stream g_default_stream;
thread_local Context* t_current = nullptr;

// Live streams by handle. Waiting on a stream holds a reference, so a stream destroyed by one
// thread while another drains every stream (cuCtxSynchronize) stays alive until that drain ends.
std::mutex g_streams_mu;  // guards streams() and every Stream::capture
std::map<Stream*, std::shared_ptr<Stream>>& streams() {
    static std::map<Stream*, std::shared_ptr<Stream>> s{
        {&g_default_stream, std::shared_ptr<Stream>(&g_default_stream, [](Stream*) {})}};
    return s;
}
std::shared_ptr<Stream> live(Stream* s) {
    std::lock_guard<std::mutex> g(g_streams_mu);
    auto it = streams().find(s);
    return it == streams().end() ? nullptr : it->second;
}

void note(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "glimpse-sim: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

Stream* stream_of(void* h) {
    // 0 is the legacy default stream, 1 CU_STREAM_LEGACY, 2 CU_STREAM_PER_THREAD.
    if ((uintptr_t)h <= 2) return &g_default_stream;
    return static_cast<Stream*>(h);
}
bool is_legacy(void* h) { return (uintptr_t)h <= 2; }

// ---- capture rules --------------------------------------------------------------------------

// Called by every potentially unsafe call (sync, alloc, free): fails and invalidates the
// captures it would break. `on` is the stream it waits on, if any.
bool unsafe_during_capture(Stream* on) {
    std::lock_guard<std::mutex> g(g_streams_mu);
    bool bad = false;
    const auto me = std::this_thread::get_id();
    for (auto& [s, keep] : streams()) {
        Capture& c = s->capture;
        if (!c.active) continue;
        const bool hits = s == on || (c.mode == 0) || (c.mode == 1 && c.owner == me);
        if (hits) {
            c.invalidated = true;
            bad = true;
        }
    }
    return bad;
}

// Records `op` into the stream's capture when one is active; returns false otherwise.
bool captured(Stream* s, Op& op) {
    std::lock_guard<std::mutex> g(g_streams_mu);
    if (!s->capture.active) return false;
    if (!s->capture.invalidated) s->capture.graph->ops.push_back(std::move(op));
    return true;
}

// ---- running operations ---------------------------------------------------------------------

bool range_ok(uintptr_t p, size_t bytes, const char* what) {
    std::string why;
    if (gsim::device_range_ok(p, bytes, &why)) return true;
    note("%s: %s", what, why.c_str());
    return false;
}

void fail_stream(Stream* s, int code, const std::string& msg) {
    note("%s", msg.c_str());
    if (!s->error) {
        s->error = code;
        s->error_msg = msg;
    }
}

void run_op(Stream* s, Op& op) {
    switch (op.kind) {
        case Op::KERNEL: {
            std::vector<void*> args(op.offsets.size());
            for (size_t i = 0; i < args.size(); ++i) args[i] = op.params.data() + op.offsets[i];
            std::string err;
            const int rc = gsim::run_kernel(*op.f->k, op.cfg, args.data(), &err);
            if (rc) fail_stream(s, rc, "kernel " + std::string(op.f->k->name) + " failed: " + err);
            break;
        }
        case Op::COPY:
            memcpy((void*)op.dst, op.staged.empty() ? (const void*)op.src : op.staged.data(), op.bytes);
            break;
        case Op::COPY2D:
            for (size_t r = 0; r < op.rows; ++r)
                memcpy((void*)(op.dst + r * op.dst_pitch),
                       op.staged.empty() ? (const void*)(op.src + r * op.src_pitch) : op.staged.data() + r * op.bytes,
                       op.bytes);
            break;
        case Op::MEMSET:
            for (size_t i = 0; i < op.count; ++i) memcpy((void*)(op.dst + i * op.elem), &op.value, op.elem);
            break;
        case Op::EVENT:
            op.event->pending = false;
            op.event->recorded = true;
            op.event->when = std::chrono::steady_clock::now();
            break;
        case Op::HOST_FUNC:
            op.fn(op.user);
            break;
    }
}

// Runs everything queued on `s` (if it still exists); returns (and clears) the first failure.
int flush(Stream* handle) {
    const std::shared_ptr<Stream> keep = live(handle);
    if (!keep) return 0;  // destroyed: its work ran when it was destroyed
    Stream* s = keep.get();
    std::lock_guard<std::mutex> g(s->mu);
    while (!s->queue.empty()) {
        Op op = std::move(s->queue.front());
        s->queue.pop_front();
        if (s->error && op.kind != Op::EVENT) continue;  // a failed stream skips the rest of its work
        run_op(s, op);
    }
    const int e = s->error;
    s->error = 0;
    s->error_msg.clear();
    return e;
}

int flush_all() {
    std::vector<std::shared_ptr<Stream>> all;
    {
        std::lock_guard<std::mutex> g(g_streams_mu);
        for (auto& [s, keep] : streams()) all.push_back(keep);
    }
    int first = 0;
    for (auto& s : all) {
        const int e = flush(s.get());
        if (!first) first = e;
    }
    return first;
}

CUresult enqueue(void* h, Op&& op) {
    Stream* s = stream_of(h);
    if (is_legacy(h) && unsafe_during_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (captured(s, op)) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> g(s->mu);
    s->queue.push_back(std::move(op));
    return CUDA_SUCCESS;
}

// A copy between host and device: pageable host memory is staged now (host to device) or the
// stream is drained and the copy done now (device to host), as the driver does; pinned memory
// waits for the stream.
CUresult copy(void* h, uintptr_t dst, uintptr_t src, size_t bytes, bool dst_host, bool src_host, bool sync) {
    if (bytes == 0) return CUDA_SUCCESS;
    if (!dst_host && !range_ok(dst, bytes, "copy destination")) return CUDA_ERROR_INVALID_VALUE;
    if (!src_host && !range_ok(src, bytes, "copy source")) return CUDA_ERROR_INVALID_VALUE;
    Stream* s = stream_of(h);
    const bool pageable = (src_host && !gsim::is_pinned_host((void*)src)) || (dst_host && !gsim::is_pinned_host((void*)dst));
    if (sync || (pageable && dst_host)) {
        if (unsafe_during_capture(s)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        if (int e = sync ? flush_all() : flush(s)) return e;
        memcpy((void*)dst, (const void*)src, bytes);
        return CUDA_SUCCESS;
    }
    Op op;
    op.kind = Op::COPY;
    op.dst = dst;
    op.src = src;
    op.bytes = bytes;
    if (pageable) {
        {
            std::lock_guard<std::mutex> g(g_streams_mu);
            if (s->capture.active) {
                s->capture.invalidated = true;  // a graph cannot replay a pageable copy
                return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
            }
        }
        op.staged.assign((const unsigned char*)src, (const unsigned char*)src + bytes);
    }
    return enqueue(h, std::move(op));
}

CUresult memset_op(CUdeviceptr dst, uint32_t value, unsigned elem, size_t n, void* h, bool sync) {
    if (n == 0) return CUDA_SUCCESS;
    if (!range_ok((uintptr_t)dst, n * elem, "memset")) return CUDA_ERROR_INVALID_VALUE;
    Op op;
    op.kind = Op::MEMSET;
    op.dst = (uintptr_t)dst;
    op.value = value;
    op.elem = elem;
    op.count = n;
    if (CUresult r = enqueue(h, std::move(op))) return r;
    return sync ? flush(stream_of(h)) : CUDA_SUCCESS;
}

const char* error_name(int e) {
    switch (e) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_NOT_READY: return "CUDA_ERROR_NOT_READY";
        case CUDA_ERROR_ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case CUDA_ERROR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}

constexpr size_t kTotalMemory = 80ull << 30;

}  // namespace

// ---- the C API -------------------------------------------------------------------------------
extern "C" {

CUresult cuInit(unsigned) { return CUDA_SUCCESS; }
CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = error_name(e);
    return CUDA_SUCCESS;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = error_name(e);
    return CUDA_SUCCESS;
}

// Devices: one simulated sm_90 device.
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "glimpse simulated device (sm_90, kernels run on the CPU)");
    return CUDA_SUCCESS;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = kTotalMemory;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case 1: *v = 1024; break;                   // max threads per block
        case 2: case 3: *v = 1024; break;           // block dims x, y
        case 4: *v = 64; break;                     // block dim z
        case 5: *v = 2147483647; break;             // grid x
        case 6: case 7: *v = 65535; break;          // grid y, z
        case 8: *v = 48 * 1024; break;              // shared memory per block
        case 10: *v = 32; break;                    // warp size
        case 16: *v = 132; break;                   // SMs (an H100 SXM's count)
        case 39: *v = 2048; break;                  // threads per SM
        case 75: *v = 9; break;                     // compute capability
        case 76: *v = 0; break;
        case 81: *v = 228 * 1024; break;            // shared memory per SM
        case 97: *v = GSIM_MAX_DYNAMIC_SMEM; break; // opt-in shared memory per block
        case 41: *v = 1; break;                     // unified addressing
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

// Contexts: the primary context.
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
    if (d != 0) return CUDA_ERROR_INVALID_DEVICE;
    ++g_ctx.refs;
    *ctx = &g_ctx;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) {
    --g_ctx.refs;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(void* ctx) {
    t_current = static_cast<Context*>(ctx);
    return CUDA_SUCCESS;
}
CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = t_current;
    return CUDA_SUCCESS;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuCtxSynchronize() {
    if (unsafe_during_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return flush_all();
}
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }

// Memory.
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (unsafe_during_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (bytes > kTotalMemory - gsim::device_bytes_in_use()) return CUDA_ERROR_OUT_OF_MEMORY;
    *p = gsim::device_alloc(bytes);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (unsafe_during_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    const int e = flush_all();  // the free waits for the device, as cuMemFree does
    if (!gsim::device_free(p)) {
        note("cuMemFree of 0x%llx, which is not the start of a live allocation", p);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return e;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *total = kTotalMemory;
    *free_bytes = kTotalMemory - gsim::device_bytes_in_use();
    return CUDA_SUCCESS;
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    if (unsafe_during_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    *p = gsim::host_alloc(bytes);
    return *p ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}
CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
CUresult cuMemFreeHost(void* p) {
    if (unsafe_during_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    const int e = flush_all();
    return gsim::host_free(p) ? e : CUDA_ERROR_INVALID_VALUE;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return copy(nullptr, (uintptr_t)dst, (uintptr_t)src, n, false, true, true);
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return copy(nullptr, (uintptr_t)dst, (uintptr_t)src, n, true, false, true);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy(nullptr, (uintptr_t)dst, (uintptr_t)src, n, false, false, true);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* s) {
    return copy(s, (uintptr_t)dst, (uintptr_t)src, n, false, true, false);
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* s) {
    return copy(s, (uintptr_t)dst, (uintptr_t)src, n, true, false, false);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* s) {
    return copy(s, (uintptr_t)dst, (uintptr_t)src, n, false, false, false);
}

// CUDA_MEMCPY2D (v2 layout).
struct Memcpy2D {
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void* srcHost;
    CUdeviceptr srcDevice;
    void* srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void* dstHost;
    CUdeviceptr dstDevice;
    void* dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
};

CUresult cuMemcpy2DAsync_v2(const Memcpy2D* c, void* s) {
    enum { HOST = 1, DEVICE = 2, ARRAY = 3, UNIFIED = 4 };
    if (c->srcMemoryType == ARRAY || c->dstMemoryType == ARRAY) return CUDA_ERROR_NOT_SUPPORTED;
    if (c->WidthInBytes == 0 || c->Height == 0) return CUDA_SUCCESS;
    if (c->WidthInBytes > c->srcPitch || c->WidthInBytes > c->dstPitch) return CUDA_ERROR_INVALID_VALUE;
    const bool src_host = c->srcMemoryType == HOST, dst_host = c->dstMemoryType == HOST;
    const uintptr_t src = (src_host ? (uintptr_t)c->srcHost : (uintptr_t)c->srcDevice) + c->srcY * c->srcPitch + c->srcXInBytes;
    const uintptr_t dst = (dst_host ? (uintptr_t)c->dstHost : (uintptr_t)c->dstDevice) + c->dstY * c->dstPitch + c->dstXInBytes;
    const size_t src_span = (c->Height - 1) * c->srcPitch + c->WidthInBytes;
    const size_t dst_span = (c->Height - 1) * c->dstPitch + c->WidthInBytes;
    if (!src_host && !range_ok(src, src_span, "2D copy source")) return CUDA_ERROR_INVALID_VALUE;
    if (!dst_host && !range_ok(dst, dst_span, "2D copy destination")) return CUDA_ERROR_INVALID_VALUE;
    if (src_host || dst_host) {
        // Host rows: done at the call after draining the stream (glimpse copies rows device to
        // device; host 2D copies are kept simple and synchronous).
        if (unsafe_during_capture(stream_of(s))) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        if (int e = flush(stream_of(s))) return e;
        for (size_t r = 0; r < c->Height; ++r)
            memcpy((void*)(dst + r * c->dstPitch), (const void*)(src + r * c->srcPitch), c->WidthInBytes);
        return CUDA_SUCCESS;
    }
    Op op;
    op.kind = Op::COPY2D;
    op.dst = dst;
    op.src = src;
    op.bytes = c->WidthInBytes;
    op.rows = c->Height;
    op.dst_pitch = c->dstPitch;
    op.src_pitch = c->srcPitch;
    return enqueue(s, std::move(op));
}
CUresult cuMemcpy2D_v2(const Memcpy2D* c) {
    if (CUresult r = cuMemcpy2DAsync_v2(c, nullptr)) return r;
    return flush_all();
}

CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* s) { return memset_op(d, v, 1, n, s, false); }
CUresult cuMemsetD16Async(CUdeviceptr d, unsigned short v, size_t n, void* s) { return memset_op(d, v, 2, n, s, false); }
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void* s) { return memset_op(d, v, 4, n, s, false); }
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) { return memset_op(d, v, 1, n, nullptr, true); }
CUresult cuMemsetD16_v2(CUdeviceptr d, unsigned short v, size_t n) { return memset_op(d, v, 2, n, nullptr, true); }
CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) { return memset_op(d, v, 4, n, nullptr, true); }

// Streams.
CUresult cuStreamCreate(void** s, unsigned) {
    auto st = std::make_shared<Stream>();
    std::lock_guard<std::mutex> g(g_streams_mu);
    streams()[st.get()] = st;
    *s = st.get();
    return CUDA_SUCCESS;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
CUresult cuStreamDestroy_v2(void* h) {
    if (is_legacy(h)) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = stream_of(h);
    if (!live(s)) return CUDA_ERROR_INVALID_HANDLE;
    flush(s);  // queued work still completes
    std::lock_guard<std::mutex> g(g_streams_mu);
    streams().erase(s);  // freed when the last waiter lets go
    return CUDA_SUCCESS;
}
CUresult cuStreamSynchronize(void* h) {
    if (unsafe_during_capture(stream_of(h))) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return is_legacy(h) ? flush_all() : flush(stream_of(h));
}
CUresult cuStreamQuery(void* h) { return cuStreamSynchronize(h); }
CUresult cuStreamWaitEvent(void* h, void* ev, unsigned) {
    Event* e = static_cast<Event*>(ev);
    // Work on `h` must follow the event: run the recording stream up to now.
    if (e->pending && e->stream && e->stream != stream_of(h)) return flush(e->stream);
    return CUDA_SUCCESS;
}
CUresult cuLaunchHostFunc(void* h, void (*fn)(void*), void* user) {
    Op op;
    op.kind = Op::HOST_FUNC;
    op.fn = fn;
    op.user = user;
    return enqueue(h, std::move(op));
}

// Capture and graphs.
CUresult cuStreamBeginCapture_v2(void* h, int mode) {
    if (is_legacy(h)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    Stream* s = stream_of(h);
    std::lock_guard<std::mutex> g(g_streams_mu);
    if (s->capture.active) return CUDA_ERROR_ILLEGAL_STATE;
    s->capture = Capture{true, mode, false, std::this_thread::get_id(), new Graph()};
    return CUDA_SUCCESS;
}
CUresult cuStreamBeginCapture(void* h, int mode) { return cuStreamBeginCapture_v2(h, mode); }
CUresult cuStreamEndCapture(void* h, void** graph) {
    Stream* s = stream_of(h);
    std::lock_guard<std::mutex> g(g_streams_mu);
    if (!s->capture.active) return CUDA_ERROR_ILLEGAL_STATE;
    if (s->capture.mode != 2 && s->capture.owner != std::this_thread::get_id()) return CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
    Capture c = s->capture;
    s->capture = Capture{};
    if (c.invalidated) {
        delete c.graph;
        *graph = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *graph = c.graph;
    return CUDA_SUCCESS;
}
CUresult cuStreamIsCapturing(void* h, int* status) {
    Stream* s = stream_of(h);
    std::lock_guard<std::mutex> g(g_streams_mu);
    *status = !s->capture.active ? 0 : s->capture.invalidated ? 2 : 1;
    return CUDA_SUCCESS;
}
CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (!graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new Graph(*static_cast<Graph*>(graph));
    return CUDA_SUCCESS;
}
CUresult cuGraphLaunch(void* exec, void* h) {
    if (!exec) return CUDA_ERROR_INVALID_VALUE;
    for (const Op& op : static_cast<Graph*>(exec)->ops) {
        Op copy_of = op;
        if (CUresult r = enqueue(h, std::move(copy_of))) return r;
    }
    return CUDA_SUCCESS;
}
CUresult cuGraphUpload(void*, void*) { return CUDA_SUCCESS; }
CUresult cuGraphDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return CUDA_SUCCESS;
}
CUresult cuGraphExecDestroy(void* g) {
    delete static_cast<Graph*>(g);
    return CUDA_SUCCESS;
}

// Events.
CUresult cuEventCreate(void** ev, unsigned) {
    *ev = new Event();
    return CUDA_SUCCESS;
}
CUresult cuEventDestroy_v2(void* ev) {
    delete static_cast<Event*>(ev);
    return CUDA_SUCCESS;
}
CUresult cuEventRecord(void* ev, void* h) {
    Event* e = static_cast<Event*>(ev);
    e->stream = stream_of(h);
    e->pending = true;
    Op op;
    op.kind = Op::EVENT;
    op.event = e;
    return enqueue(h, std::move(op));
}
CUresult cuEventRecordWithFlags(void* ev, void* h, unsigned) { return cuEventRecord(ev, h); }
CUresult cuEventSynchronize(void* ev) {
    Event* e = static_cast<Event*>(ev);
    if (unsafe_during_capture(e->stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return e->pending && e->stream ? flush(e->stream) : CUDA_SUCCESS;
}
CUresult cuEventQuery(void* ev) { return cuEventSynchronize(ev); }
CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    Event* a = static_cast<Event*>(start);
    Event* b = static_cast<Event*>(end);
    if (!a->recorded || !b->recorded || a->pending || b->pending) return CUDA_ERROR_NOT_READY;
    *ms = std::chrono::duration<float, std::milli>(b->when - a->when).count();
    return CUDA_SUCCESS;
}
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

// Modules and functions: the image (an nvcc fatbin) is not executed; its kernels are the host
// builds in the kernel library, looked up by name.
CUresult cuModuleLoadData(void** m, const void* image) {
    if (!image) return CUDA_ERROR_INVALID_IMAGE;
    std::string why;
    gsim::find_kernel("", &why);  // loads the kernel library, reports if it is missing
    if (why.rfind("no kernel named", 0) != 0) {
        note("%s", why.c_str());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *m = new Module();
    return CUDA_SUCCESS;
}
CUresult cuModuleUnload(void* m) {
    delete static_cast<Module*>(m);
    return CUDA_SUCCESS;
}
CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    std::string why;
    const KernelInfo* k = gsim::find_kernel(name, &why);
    if (!k) return CUDA_ERROR_NOT_FOUND;
    auto* mod = static_cast<Module*>(m);
    mod->functions.push_back(std::make_unique<Function>(Function{k}));
    *f = mod->functions.back().get();
    return CUDA_SUCCESS;
}
CUresult cuFuncSetAttribute(void* f, int attr, int value) {
    Function* fn = static_cast<Function*>(f);
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > GSIM_MAX_DYNAMIC_SMEM) return CUDA_ERROR_INVALID_VALUE;
        fn->max_dynamic_smem = (unsigned)value;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    Function* fn = static_cast<Function*>(f);
    switch (attr) {
        case 0: *v = fn->k->max_threads; break;  // MAX_THREADS_PER_BLOCK
        case 8: *v = (int)fn->max_dynamic_smem; break;
        case 4: *v = 32; break;  // NUM_REGS (not simulated)
        case 5: case 6: *v = 90; break;
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}
CUresult cuFuncSetCacheConfig(void*, int) { return CUDA_SUCCESS; }

CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shmem, void* h, void** params, void** extra) {
    Function* fn = static_cast<Function*>(f);
    if (!fn) return CUDA_ERROR_INVALID_HANDLE;
    if (extra || (!params && fn->k->nparams > 0)) {
        note("cuLaunchKernel %s: only kernelParams are supported", fn->k->name);
        return CUDA_ERROR_INVALID_VALUE;
    }
    Op op;
    op.kind = Op::KERNEL;
    op.f = fn;
    op.cfg = gsim::LaunchConfig{dim3{gx, gy, gz}, dim3{bx, by, bz}, shmem, fn->max_dynamic_smem};
    // The configuration is checked at the launch, as the driver does.
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (threads == 0 || threads > 1024 || !gx || !gy || !gz) return CUDA_ERROR_INVALID_VALUE;
    if (threads > (unsigned long long)fn->k->max_threads) {
        note("%s: launched with %llu threads per block, its __launch_bounds__ allow %d", fn->k->name, threads,
             fn->k->max_threads);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if (shmem > (fn->max_dynamic_smem > 48 * 1024 ? fn->max_dynamic_smem : 48 * 1024)) {
        note("%s: %u bytes of dynamic shared memory without raising CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES "
             "(now %u)",
             fn->k->name, shmem, fn->max_dynamic_smem);
        return CUDA_ERROR_INVALID_VALUE;
    }
    size_t off = 0;
    for (int i = 0; i < fn->k->nparams; ++i) {
        const size_t a = fn->k->param_aligns[i];
        off = (off + a - 1) / a * a;
        op.offsets.push_back(off);
        off += fn->k->param_sizes[i];
    }
    op.params.resize(off + 16);
    // Keep every parameter suitably aligned in the blob: offsets are relative to a 16-aligned base.
    for (int i = 0; i < fn->k->nparams; ++i) memcpy(op.params.data() + op.offsets[i], params[i], fn->k->param_sizes[i]);
    return enqueue(h, std::move(op));
}

}  // extern "C"
