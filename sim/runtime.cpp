// The simulated device's execution engine: runs one kernel launch on the calling OS thread, block
// after block, every CUDA thread of a block as a fiber with a stack of its own.
//
// - Fibers switch only at `__syncthreads` and warp operations (shuffles, ballots, ldmatrix,
//   mma.sync, __syncwarp), so between two such points a thread runs alone. The default order is
//   ascending thread index; GLIMPSE_SIM_SCHED=random picks a seeded random order at every pass
//   (the seed is printed; GLIMPSE_SIM_SEED=N repeats it), and =reverse runs descending.
// - A barrier releases when every thread of the block has reached it; a thread that exits while
//   others wait at one (or reaches one after another exited) is an error, as is a warp operation
//   whose lanes disagree on the operation, a lane outside its own mask, or a block with nothing
//   left to run (deadlock).
// - Shared memory (the kernel library's thread-local storage) is filled with 0xff bytes (NaN) at
//   the start of every block.
// - A fault inside a kernel (an access to a guard page, sim/memory.cpp) ends the launch with
//   CUDA_ERROR_ILLEGAL_ADDRESS and a message naming the kernel, the block, the thread and the
//   allocation; guard bytes are checked after the launch.
// - Under ThreadSanitizer (the kernel library built with -fsanitize=thread, scripts/sim-check.sh)
//   every fiber is a TSan fiber, switches carry no synchronisation, and barriers are
//   release/acquire pairs: a missing __syncthreads is reported as a data race even when the
//   result happens to be right.
#include <dlfcn.h>
#include <link.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "sim.h"

// ThreadSanitizer's fiber and synchronisation interface; present only when the process runs with
// the TSan runtime (LD_PRELOAD=libtsan.so in the TSan pass).
extern "C" {
__attribute__((weak)) void* __tsan_get_current_fiber(void);
__attribute__((weak)) void* __tsan_create_fiber(unsigned flags);
__attribute__((weak)) void __tsan_destroy_fiber(void* fiber);
__attribute__((weak)) void __tsan_switch_to_fiber(void* fiber, unsigned flags);
__attribute__((weak)) void __tsan_acquire(void* addr);
__attribute__((weak)) void __tsan_release(void* addr);
}

// ---------------------------------------------------------------------------------------------
// Context switch (x86-64 System V): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores the stack pointer in *from and continues on `to`.
extern "C" void gsim_switch(void** from, void* to);
extern "C" void gsim_fiber_trampoline();
#if defined(__x86_64__)
asm(R"(
    .text
    .globl gsim_switch
    .type gsim_switch,@function
gsim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    stmxcsr 8(%rsp)
    fnstcw (%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size gsim_switch, .-gsim_switch

    .globl gsim_fiber_trampoline
    .type gsim_fiber_trampoline,@function
gsim_fiber_trampoline:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size gsim_fiber_trampoline, .-gsim_fiber_trampoline
)");
#else
#error "the simulated device's fibers are implemented for x86-64 only"
#endif

namespace gsim {
namespace {

const char* const kWarpOpNames[WOP_COUNT] = {
    "?",          "__syncwarp",   "__shfl_sync", "__shfl_up_sync",   "__shfl_down_sync", "__shfl_xor_sync",
    "__ballot_sync", "__any_sync", "__all_sync", "ldmatrix.sync.x4", "mma.sync.m16n8k16",
};

enum LaneState { RUNNABLE, AT_BARRIER, AT_WARP, EXITED };

struct Group {  // one warp operation in progress: the lanes of `mask` meeting
    int kind;
    unsigned mask;
    unsigned arrived;
    int readers;  // lanes that still read `view` (returned to the pool at 0)
    WarpView view;
};

struct Lane {
    LaneState state;  // first: the scheduler scans it for every lane at every pass
    Thread t;
    void* sp;
    unsigned char* stack;  // mapping: guard page + stack
    size_t stack_bytes;
    Group* group;          // the warp operation it waits at or last read
    unsigned bar_gen;      // the barrier generation it waits at
    void* tsan_fiber;
};

struct Warp {
    std::vector<Group*> open;
    unsigned exited;  // lanes that exited or do not exist (a partial last warp)
    unsigned syncwarp_gen;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Exec {
    const KernelInfo* k = nullptr;
    LaunchConfig cfg{};
    void* const* params = nullptr;
    std::vector<Lane> lanes;  // capacity kept across launches (stacks reused)
    std::vector<Warp> warps;
    std::vector<Group*> pool;
    size_t groups_made = 0;
    int nthreads = 0, exited = 0, at_bar = 0;
    unsigned bar_gen = 0;
    uint3 bid{};
    Lane* cur = nullptr;
    void* sched_sp = nullptr;
    void* sched_fiber = nullptr;
    std::string error;
    int error_code = 0;
    sigjmp_buf jmp;
    volatile sig_atomic_t in_kernel = 0;
    void* volatile fault_addr = nullptr;
    unsigned char* tls_base = nullptr;
    size_t tls_bytes = 0;
    // What to fill at every block start: the static shared variables and the bytes of the
    // dynamic arrays this launch uses (not the rest of their 227 KiB).
    std::vector<std::pair<unsigned char*, size_t>> poison;
    std::mt19937_64 rng;
    int sched_mode = 0;  // 0 ascending, 1 random, 2 descending
    // TSan synchronisation objects (addresses only).
    char bar_sync[2] = {0, 0};
    char block_start = 0, block_end = 0;
    char syncwarp_sync[32][2];
};

thread_local Exec* t_exec = nullptr;

Exec& exec() {
    if (!t_exec) t_exec = new Exec();  // one per OS thread that launches; kept for its lifetime
    return *t_exec;
}

bool tsan() { return __tsan_switch_to_fiber != nullptr; }

// ---- kernel library ------------------------------------------------------------------------

struct KernelLib {
    void* handle = nullptr;
    const KernelInfo* kernels = nullptr;
    int count = 0;
    void* (*tls_anchor)() = nullptr;
    int (*dynamic_smem)(void**, int) = nullptr;
    size_t tls_memsz = 0;
    std::string error;
};

[[noreturn]] void fail_current(const char* what);

Thread* api_self() { return &t_exec->cur->t; }
void api_syncthreads();
const WarpView* api_warp_op(int kind, unsigned mask, const uint32_t* words, int n);
uint32_t api_to_shared(const void* p);
unsigned char* api_from_shared(uint32_t addr, unsigned bytes);
void api_check_global(const void* p, unsigned bytes, const char* what);

const Api kApi = {api_self, api_syncthreads, api_warp_op, api_to_shared, api_from_shared, fail_current, api_check_global};

KernelLib& lib() {
    static KernelLib l;
    static std::once_flag once;
    std::call_once(once, [] {
        // The kernel library sits beside this (driver) library; GLIMPSE_SIM_KERNELS overrides.
        std::string path;
        if (const char* env = getenv("GLIMPSE_SIM_KERNELS")) {
            path = env;
        } else {
            Dl_info info;
            if (dladdr((void*)&lib, &info) && info.dli_fname) {
                path = info.dli_fname;
                const size_t slash = path.rfind('/');
                path = (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) +
                       "libglimpse_sim_kernels.so";
            }
        }
        l.handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!l.handle) {
            l.error = "cannot load the simulated device's kernel library " + path + ": " + dlerror() +
                      " (build it with scripts/sim-build.sh)";
            return;
        }
        auto bind = (void (*)(const Api*))dlsym(l.handle, "gsim_bind");
        auto table = (const KernelInfo* (*)(int*))dlsym(l.handle, "gsim_kernel_table");
        l.tls_anchor = (void* (*)())dlsym(l.handle, "gsim_tls_anchor");
        l.dynamic_smem = (int (*)(void**, int))dlsym(l.handle, "gsim_dynamic_smem");
        if (!bind || !table || !l.tls_anchor || !l.dynamic_smem) {
            l.error = path + " lacks gsim_bind / gsim_kernel_table / gsim_tls_anchor / gsim_dynamic_smem";
            l.handle = nullptr;
            return;
        }
        bind(&kApi);
        l.kernels = table(&l.count);
        // Size of the library's TLS segment: all of it is shared memory.
        struct link_map* lm = nullptr;
        dlinfo(l.handle, RTLD_DI_LINKMAP, &lm);
        struct Find {
            ElfW(Addr) base;
            size_t memsz;
        } find{lm ? lm->l_addr : 0, 0};
        dl_iterate_phdr(
            [](struct dl_phdr_info* info, size_t, void* data) -> int {
                auto* f = static_cast<Find*>(data);
                if (info->dlpi_addr != f->base) return 0;
                for (int i = 0; i < info->dlpi_phnum; ++i)
                    if (info->dlpi_phdr[i].p_type == PT_TLS) f->memsz = info->dlpi_phdr[i].p_memsz;
                return 1;
            },
            &find);
        l.tls_memsz = find.memsz;
    });
    return l;
}

// ---- faults --------------------------------------------------------------------------------

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* si, void* uc) {
    Exec* e = t_exec;
    if (e && e->in_kernel) {
        e->fault_addr = si->si_addr;
        siglongjmp(e->jmp, sig);
    }
    // Not a simulated kernel's fault: hand it to whoever handled it before.
    const struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
    if (old.sa_flags & SA_SIGINFO) {
        if (old.sa_sigaction) return old.sa_sigaction(sig, si, uc);
    } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN && old.sa_handler) {
        return old.sa_handler(sig);
    }
    sigaction(sig, &old, nullptr);  // default action on return (the access faults again)
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
    });
    // Every launching thread needs an alternate stack (a fault on a fiber's guard page).
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && (cur.ss_flags & SS_DISABLE)) {
        stack_t ss;
        ss.ss_size = 64 * 1024;
        ss.ss_sp = malloc(ss.ss_size);
        ss.ss_flags = 0;
        if (ss.ss_sp) sigaltstack(&ss, nullptr);
    }
}

// ---- fibers --------------------------------------------------------------------------------

std::string thread_name(const Exec& e, const Lane* l) {
    char buf[160];
    snprintf(buf, sizeof buf, "%s, block (%u,%u,%u), thread (%u,%u,%u) (warp %u lane %u)", e.k->name, e.bid.x, e.bid.y,
             e.bid.z, l->t.tid.x, l->t.tid.y, l->t.tid.z, l->t.warp, l->t.lane);
    return buf;
}

void to_scheduler(Exec& e) {
    Lane* me = e.cur;
    if (tsan()) __tsan_switch_to_fiber(e.sched_fiber, 1);
    gsim_switch(&me->sp, e.sched_sp);
}

[[noreturn]] void fail_current(const char* what) {
    Exec& e = *t_exec;
    if (e.error.empty()) {
        e.error = std::string(what) + " (in " + thread_name(e, e.cur) + ")";
        e.error_code = 719;  // CUDA_ERROR_LAUNCH_FAILED
    }
    to_scheduler(e);
    abort();  // never resumed
}

void release_view(Exec& e, Lane* l) {
    if (l->group && l->state != AT_WARP) {
        if (--l->group->readers == 0) e.pool.push_back(l->group);
        l->group = nullptr;
    }
}

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 for the whole warp (PTX ISA, "Matrix
// fragments for mma.m16n8k16"; group g = lane / 4, t = lane % 4). Lane words: 0-3 the A
// registers, 4-5 the B registers, 6-9 the C floats.
//   A register r of lane l: (row g + 8 (r % 2), cols 2t + 8 (r / 2) + {0, 1}), low half first;
//   B register r: (rows 2t + 8r + {0, 1}, col g);
//   C/D element i: (row g + 8 (i / 2), col 2t + i % 2).
// Products of fp16 values are exact in fp32; each D element sums its 16 products in k order with
// fp32 fma onto C (hardware accumulates within a few fp32 ulps of this; docs/simulated-device.md).
const float* f16_table() {  // every fp16 bit pattern as fp32 (exact)
    static const std::vector<float> t = [] {
        std::vector<float> v(65536);
        for (uint32_t i = 0; i < 65536; ++i) v[i] = f16_bits_to_f32((uint16_t)i);
        return v;
    }();
    return t.data();
}

void mma_16816(WarpView& v) {
    float a[16][16], b[16][8], c[16][8];
    const float* f16 = f16_table();
    auto half = [f16](uint32_t word, int hi) { return f16[(word >> (16 * hi)) & 0xffffu]; };
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        const uint32_t* w = v.words[lane];
        for (int r = 0; r < 4; ++r)
            for (int h = 0; h < 2; ++h) a[g + 8 * (r % 2)][2 * t + 8 * (r / 2) + h] = half(w[r], h);
        for (int r = 0; r < 2; ++r)
            for (int h = 0; h < 2; ++h) b[2 * t + 8 * r + h][g] = half(w[4 + r], h);
        for (int i = 0; i < 4; ++i) memcpy(&c[g + 8 * (i / 2)][2 * t + i % 2], &w[6 + i], 4);
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
            float acc = c[row][col];
            for (int k = 0; k < 16; ++k) acc = fmaf(a[row][k], b[k][col], acc);
            v.mma_d[lane][i] = acc;
        }
    }
}

void complete_group(Exec& e, Warp& w, Group* g, Lane* waking_self) {
    g->view.participants = g->arrived;
    if (g->kind == WOP_MMA_16816 && g->arrived == 0xffffffffu) mma_16816(g->view);
    g->readers = __builtin_popcount(g->arrived);
    for (size_t i = 0; i < w.open.size(); ++i)
        if (w.open[i] == g) {
            w.open.erase(w.open.begin() + (long)i);
            break;
        }
    const int base = (int)(&w - e.warps.data()) * 32;
    for (int l = 0; l < 32; ++l)
        if ((g->arrived >> l) & 1u) {
            Lane& lane = e.lanes[(size_t)(base + l)];
            if (&lane != waking_self) lane.state = RUNNABLE;
        }
}

void lane_exit(Exec& e, Lane* me) {
    if (e.at_bar > 0) {
        char buf[200];
        snprintf(buf, sizeof buf, "thread exits while %d thread(s) of its block wait at __syncthreads (barrier divergence)",
                 e.at_bar);
        fail_current(buf);
    }
    // Pending cp.async copies of an exiting thread can no longer be observed by it; dropped.
    me->t.npending = 0;
    release_view(e, me);
    me->state = EXITED;
    ++e.exited;
    Warp& w = e.warps[me->t.warp];
    w.exited |= 1u << me->t.lane;
    // Operations that waited only for this lane may complete now.
    for (size_t i = 0; i < w.open.size();) {
        Group* g = w.open[i];
        if (((g->arrived | w.exited) & g->mask) == g->mask && g->arrived) {
            complete_group(e, w, g, nullptr);
        } else {
            ++i;
        }
    }
    if (tsan()) __tsan_release(&e.block_end);
}

void fiber_main(void* arg) {
    Lane* me = static_cast<Lane*>(arg);
    Exec& e = *t_exec;
    if (tsan()) __tsan_acquire(&e.block_start);
    e.k->thunk(e.params);
    lane_exit(e, me);
    to_scheduler(e);
    abort();
}

void prepare_lane(Exec& e, Lane& l) {
    if (!l.stack) {
        const size_t pg = (size_t)sysconf(_SC_PAGESIZE);
        l.stack_bytes = kStackBytes + pg;
        void* m = mmap(nullptr, l.stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            fprintf(stderr, "glimpse-sim: cannot map a fiber stack\n");
            abort();
        }
        l.stack = static_cast<unsigned char*>(m);
        mprotect(l.stack, pg, PROT_NONE);  // overflow faults
        if (tsan()) l.tsan_fiber = __tsan_create_fiber(0);
    }
    // Initial frame for gsim_switch: x87 cw, mxcsr, r15, r14, r13 (entry), r12 (arg), rbx, rbp,
    // return address (trampoline); the trampoline's call sees a 16-byte aligned stack.
    uintptr_t top = (uintptr_t)(l.stack + l.stack_bytes) & ~(uintptr_t)15;
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
    uint16_t fpucw;
    uint32_t mxcsr;
    asm volatile("fnstcw %0" : "=m"(fpucw));
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    sp[0] = fpucw;
    sp[1] = mxcsr;
    sp[2] = 0;                          // r15
    sp[3] = 0;                          // r14
    sp[4] = (uint64_t)(uintptr_t)&fiber_main;  // r13
    sp[5] = (uint64_t)(uintptr_t)&l;    // r12
    sp[6] = 0;                          // rbx
    sp[7] = 0;                          // rbp
    sp[8] = (uint64_t)(uintptr_t)&gsim_fiber_trampoline;
    l.sp = sp;
    l.state = RUNNABLE;
    l.group = nullptr;
    l.t.npending = 0;
    l.t.committed_groups = 0;
    (void)e;
}

// ---- the device functions the kernels call -------------------------------------------------

void api_syncthreads() {
    Exec& e = *t_exec;
    Lane* me = e.cur;
    if (e.exited > 0) {
        char buf[200];
        snprintf(buf, sizeof buf, "__syncthreads reached after %d thread(s) of the block exited (barrier divergence)",
                 e.exited);
        fail_current(buf);
    }
    const unsigned gen = e.bar_gen;
    if (tsan()) __tsan_release(&e.bar_sync[gen & 1]);
    me->bar_gen = gen;
    ++e.at_bar;
    if (e.at_bar == e.nthreads) {
        e.at_bar = 0;
        ++e.bar_gen;
        for (Lane& l : e.lanes)
            if (l.state == AT_BARRIER) l.state = RUNNABLE;
    } else {
        me->state = AT_BARRIER;
        to_scheduler(e);
    }
    if (tsan()) __tsan_acquire(&e.bar_sync[gen & 1]);
}

const WarpView* api_warp_op(int kind, unsigned mask, const uint32_t* words, int n) {
    Exec& e = *t_exec;
    Lane* me = e.cur;
    const unsigned lane = me->t.lane, bit = 1u << lane;
    release_view(e, me);
    if (!(mask & bit)) {
        char buf[160];
        snprintf(buf, sizeof buf, "%s with mask 0x%08x executed by lane %u, which is not in the mask", kWarpOpNames[kind],
                 mask, lane);
        fail_current(buf);
    }
    Warp& w = e.warps[me->t.warp];
    Group* g = nullptr;
    for (Group* o : w.open)
        if (o->mask == mask) g = o;
    if (g && g->kind != kind) {
        char buf[200];
        snprintf(buf, sizeof buf, "warp divergence: lane %u executes %s while lanes 0x%08x of its mask 0x%08x wait at %s",
                 lane, kWarpOpNames[kind], g->arrived, mask, kWarpOpNames[g->kind]);
        fail_current(buf);
    }
    if (!g) {
        // The pool is filled before the block starts (run_kernel): enough for every lane to hold
        // one view while every mask of its warp has an operation open.
        if (e.pool.empty()) fail_current("more warp operations in flight than the simulator provides");
        g = e.pool.back();
        e.pool.pop_back();
        g->kind = kind;
        g->mask = mask;
        g->arrived = 0;
        g->readers = 0;
        w.open.push_back(g);
    }
    g->arrived |= bit;
    for (int i = 0; i < n; ++i) g->view.words[lane][i] = words[i];
    me->group = g;
    const unsigned gen = w.syncwarp_gen;
    if (kind == WOP_SYNCWARP && tsan()) __tsan_release(&e.syncwarp_sync[me->t.warp][gen & 1]);
    if (((g->arrived | w.exited) & mask) == mask) {
        complete_group(e, w, g, me);
        if (kind == WOP_SYNCWARP) ++w.syncwarp_gen;
    } else {
        me->state = AT_WARP;
        to_scheduler(e);
    }
    me->state = RUNNABLE;
    if (kind == WOP_SYNCWARP && tsan()) __tsan_acquire(&e.syncwarp_sync[me->t.warp][gen & 1]);
    return &g->view;
}

uint32_t api_to_shared(const void* p) {
    Exec& e = *t_exec;
    const unsigned char* q = static_cast<const unsigned char*>(p);
    if (q < e.tls_base || q >= e.tls_base + e.tls_bytes) {
        char buf[160];
        snprintf(buf, sizeof buf, "cvta.to.shared of %p, which is not shared memory", p);
        fail_current(buf);
    }
    return (uint32_t)(q - e.tls_base);
}

unsigned char* api_from_shared(uint32_t addr, unsigned bytes) {
    Exec& e = *t_exec;
    if ((size_t)addr + bytes > e.tls_bytes) {
        char buf[160];
        snprintf(buf, sizeof buf, "shared address 0x%x (+%u bytes) is past the block's shared memory (%zu bytes)", addr,
                 bytes, e.tls_bytes);
        fail_current(buf);
    }
    return e.tls_base + addr;
}

void api_check_global(const void* p, unsigned bytes, const char* what) {
    std::string why;
    if (!device_range_ok((uint64_t)(uintptr_t)p, bytes, &why)) {
        Exec& e = *t_exec;
        if (e.error.empty()) {
            e.error = std::string(what) + ": " + why + " (in " + thread_name(e, e.cur) + ")";
            e.error_code = 700;  // CUDA_ERROR_ILLEGAL_ADDRESS
        }
        to_scheduler(e);
        abort();
    }
}

// ---- scheduling ----------------------------------------------------------------------------

int sched_mode_from_env(uint64_t* seed_out) {
    static int mode = -1;
    static uint64_t seed = 0;
    static std::once_flag once;
    std::call_once(once, [] {
        const char* s = getenv("GLIMPSE_SIM_SCHED");
        const std::string v = s ? s : "";
        mode = v == "random" ? 1 : v == "reverse" ? 2 : 0;
        if (mode == 1) {
            const char* se = getenv("GLIMPSE_SIM_SEED");
            seed = se ? strtoull(se, nullptr, 10) : (uint64_t)std::random_device{}();
            fprintf(stderr, "glimpse-sim: random thread order, seed %llu (GLIMPSE_SIM_SEED=%llu repeats it)\n",
                    (unsigned long long)seed, (unsigned long long)seed);
        }
    });
    *seed_out = seed;
    return mode;
}

std::string describe_deadlock(const Exec& e) {
    int at_bar = 0;
    std::string warps;
    for (const Lane& l : e.lanes) {
        if (&l - e.lanes.data() >= e.nthreads) break;
        if (l.state == AT_BARRIER) ++at_bar;
    }
    for (size_t w = 0; w < e.warps.size(); ++w)
        for (const Group* g : e.warps[w].open) {
            char buf[200];
            snprintf(buf, sizeof buf, "; warp %zu: lanes 0x%08x wait at %s (mask 0x%08x) for lanes 0x%08x", w, g->arrived,
                     kWarpOpNames[g->kind], g->mask, g->mask & ~g->arrived & ~e.warps[w].exited);
            warps += buf;
        }
    char buf[200];
    snprintf(buf, sizeof buf, "deadlock in %s, block (%u,%u,%u): %d thread(s) wait at __syncthreads", e.k->name, e.bid.x,
             e.bid.y, e.bid.z, at_bar);
    return buf + warps;
}

// Runs one block; returns false when the launch must stop (e.error set).
bool run_block(Exec& e) {
    // Fresh shared memory: every byte 0xff (NaN). (Under TSan these writes happen before the
    // block's threads start, by the block_start release below.)
    for (const auto& [p, n] : e.poison) memset(p, 0xff, n);
    const dim3 bd = e.cfg.block;
    for (int i = 0; i < e.nthreads; ++i) {
        Lane& l = e.lanes[(size_t)i];
        prepare_lane(e, l);
        l.t.tid = uint3{(unsigned)i % bd.x, ((unsigned)i / bd.x) % bd.y, (unsigned)i / (bd.x * bd.y)};
        l.t.bid = e.bid;
        l.t.bdim = e.cfg.block;
        l.t.gdim = e.cfg.grid;
        l.t.lane = (unsigned)i % 32;
        l.t.warp = (unsigned)i / 32;
    }
    for (Warp& w : e.warps) {
        for (Group* g : w.open) e.pool.push_back(g);
        w.open.clear();
        w.exited = 0;
        w.syncwarp_gen = 0;
    }
    if (e.nthreads % 32) e.warps.back().exited = ~0u << (e.nthreads % 32);  // lanes that do not exist
    e.exited = 0;
    e.at_bar = 0;
    if (tsan()) __tsan_release(&e.block_start);

    std::vector<int> order((size_t)e.nthreads);
    for (int i = 0; i < e.nthreads; ++i) order[(size_t)i] = e.sched_mode == 2 ? e.nthreads - 1 - i : i;
    while (e.exited < e.nthreads) {
        if (e.sched_mode == 1) std::shuffle(order.begin(), order.end(), e.rng);
        bool ran = false;
        for (int i : order) {
            Lane& l = e.lanes[(size_t)i];
            if (l.state != RUNNABLE) continue;
            e.cur = &l;
            if (tsan()) __tsan_switch_to_fiber(l.tsan_fiber, 1);
            gsim_switch(&e.sched_sp, l.sp);
            ran = true;
            if (!e.error.empty()) return false;
        }
        if (!ran) {
            e.error = describe_deadlock(e);
            e.error_code = 719;
            return false;
        }
    }
    if (tsan()) __tsan_acquire(&e.block_end);
    // Views still held by exited lanes were released at exit; nothing else is outstanding.
    return true;
}

}  // namespace

const KernelInfo* find_kernel(const char* name, std::string* why) {
    KernelLib& l = lib();
    if (!l.handle) {
        if (why) *why = l.error;
        return nullptr;
    }
    for (int i = 0; i < l.count; ++i)
        if (strcmp(l.kernels[i].name, name) == 0) return &l.kernels[i];
    if (why) *why = std::string("no kernel named ") + name + " in the simulated device's kernel library";
    return nullptr;
}

void describe_schedule(std::string* out) {
    uint64_t seed;
    const int mode = sched_mode_from_env(&seed);
    *out = mode == 1 ? "random (seed " + std::to_string(seed) + ")" : mode == 2 ? "descending" : "ascending";
}

int run_kernel(const KernelInfo& k, const LaunchConfig& cfg, void* const* params, std::string* error) {
    KernelLib& l = lib();
    Exec& e = exec();
    const unsigned long long threads = (unsigned long long)cfg.block.x * cfg.block.y * cfg.block.z;
    char buf[256];
    if (threads == 0 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 || cfg.block.z > 64 ||
        cfg.grid.y > 65535 || cfg.grid.z > 65535) {
        snprintf(buf, sizeof buf, "%s: invalid launch dimensions grid (%u,%u,%u) block (%u,%u,%u)", k.name, cfg.grid.x,
                 cfg.grid.y, cfg.grid.z, cfg.block.x, cfg.block.y, cfg.block.z);
        *error = buf;
        return 1;  // CUDA_ERROR_INVALID_VALUE
    }
    if (threads > 1024 || threads > (unsigned long long)k.max_threads) {
        snprintf(buf, sizeof buf, "%s: %llu threads per block exceed its __launch_bounds__ / the device limit (%d)",
                 k.name, threads, k.max_threads < 1024 ? k.max_threads : 1024);
        *error = buf;
        return 701;  // CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES
    }
    const unsigned dyn_limit = cfg.max_dynamic_smem > 48 * 1024 ? cfg.max_dynamic_smem : 48 * 1024;
    if (cfg.dynamic_smem > dyn_limit || cfg.dynamic_smem > GSIM_MAX_DYNAMIC_SMEM) {
        snprintf(buf, sizeof buf,
                 "%s: %u bytes of dynamic shared memory exceed the function's limit of %u (raise "
                 "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES; device maximum %u)",
                 k.name, cfg.dynamic_smem, dyn_limit, (unsigned)GSIM_MAX_DYNAMIC_SMEM);
        *error = buf;
        return 1;
    }
    install_fault_handler();
    l.tls_anchor();  // allocates this thread's block of the kernel library's TLS
    void* base = nullptr;
    dlinfo(l.handle, RTLD_DI_TLS_DATA, &base);
    e.tls_base = static_cast<unsigned char*>(base);
    e.tls_bytes = l.tls_memsz;
    {
        void* dyn[64];
        const int n = std::min(l.dynamic_smem(dyn, 64), 64);
        std::vector<unsigned char*> starts;
        for (int i = 0; i < n; ++i) starts.push_back(static_cast<unsigned char*>(dyn[i]));
        std::sort(starts.begin(), starts.end());
        starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
        e.poison.clear();
        unsigned char* at = e.tls_base;
        for (unsigned char* d : starts) {
            if (d > at) e.poison.emplace_back(at, (size_t)(d - at));
            e.poison.emplace_back(d, std::min<size_t>(cfg.dynamic_smem, GSIM_MAX_DYNAMIC_SMEM));
            at = std::max(at, d + GSIM_MAX_DYNAMIC_SMEM - 16);  // the array ends within its last 16 bytes
        }
        if (at < e.tls_base + e.tls_bytes) e.poison.emplace_back(at, (size_t)(e.tls_base + e.tls_bytes - at));
    }
    uint64_t seed;
    e.sched_mode = sched_mode_from_env(&seed);
    static std::atomic<uint64_t> launches{0};
    e.rng.seed(seed + launches.fetch_add(1));
    e.k = &k;
    e.cfg = cfg;
    e.params = params;
    e.nthreads = (int)threads;
    if (e.lanes.size() < threads) e.lanes.resize(threads);  // Lane has no owning members: copies are fine
    e.warps.resize(((size_t)threads + 31) / 32);
    // Warp-operation records, made here on the scheduler's side (under TSan, memory a fiber
    // allocated would count as that fiber's write to the views other lanes read): per warp, one
    // view held by each lane plus two operations open.
    const size_t want = e.warps.size() * 34;
    while (e.groups_made < want) {
        constexpr size_t kChunk = 64;
        Group* chunk = new Group[kChunk];
        for (size_t i = 0; i < kChunk; ++i) e.pool.push_back(&chunk[i]);
        e.groups_made += kChunk;
    }
    e.error.clear();
    e.error_code = 0;
    if (tsan() && !e.sched_fiber) e.sched_fiber = __tsan_get_current_fiber();

    // Launches are ordered for TSan as they happen: each one's start sees every launch that had
    // ended (on any OS thread). The driver's own locks are invisible to TSan (not instrumented),
    // so without this a buffer freed by one test and reused by another would look shared.
    static char launch_order;
    if (tsan()) __tsan_acquire(&launch_order);
    const int sig = sigsetjmp(e.jmp, 1);
    if (sig == 0) {
        e.in_kernel = 1;
        for (unsigned z = 0; z < cfg.grid.z && e.error.empty(); ++z)
            for (unsigned y = 0; y < cfg.grid.y && e.error.empty(); ++y)
                for (unsigned x = 0; x < cfg.grid.x && e.error.empty(); ++x) {
                    e.bid = uint3{x, y, z};
                    if (!run_block(e)) break;
                }
        e.in_kernel = 0;
    } else {
        e.in_kernel = 0;
        if (tsan()) __tsan_switch_to_fiber(e.sched_fiber, 1);
        e.error = std::string("illegal address: ") + describe_address((uint64_t)(uintptr_t)e.fault_addr) + " (in " +
                  thread_name(e, e.cur) + ")";
        e.error_code = 700;
    }
    if (tsan()) __tsan_release(&launch_order);
    if (e.error.empty()) {
        const std::string guards = check_guards();
        if (!guards.empty()) {
            e.error = std::string("out-of-bounds write by ") + k.name + ": " + guards;
            e.error_code = 700;
        }
    }
    *error = e.error;
    return e.error_code;
}

}  // namespace gsim
