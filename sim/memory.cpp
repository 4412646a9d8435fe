// The simulated device's memory: every cuMemAlloc is its own mapping with an inaccessible page
// after the (256-byte rounded) end and before the start, so a kernel that reads or writes past a
// buffer faults at once (runtime.cpp turns the fault into CUDA_ERROR_ILLEGAL_ADDRESS naming the
// kernel and the allocation). The bytes between the requested size and the page edges are guard
// bytes, checked after every launch, so a small overrun inside the rounding is reported too.
// New allocations are filled with 0xff bytes (NaN as fp16 and fp32): a kernel that reads memory
// nobody wrote produces NaNs rather than plausible zeros.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <map>
#include <mutex>

#include "sim.h"

namespace gsim {
namespace {

constexpr unsigned char kGuardByte = 0xa5;
constexpr unsigned char kPoisonByte = 0xff;

struct Allocation {
    uint64_t id;
    size_t bytes;       // as requested
    size_t rounded;     // bytes rounded up to 256
    unsigned char* map; // whole mapping, guard pages included
    size_t map_bytes;
    unsigned char* lo;  // first guard byte (page after the low guard page)
};

std::mutex& mu() {
    static std::mutex m;
    return m;
}
std::map<uint64_t, Allocation>& allocs() {  // keyed by start address
    static std::map<uint64_t, Allocation> a;
    return a;
}
std::map<uintptr_t, size_t>& pinned() {  // start -> bytes
    static std::map<uintptr_t, size_t> s;
    return s;
}
uint64_t next_id = 1;
size_t in_use = 0;

size_t page() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

// The allocation whose mapping holds `p` (guard pages included); caller holds the lock.
const Allocation* owner_of(uint64_t p) {
    auto& a = allocs();
    auto it = a.upper_bound(p);
    // The allocation starting at or below p, or the next one (p in its low guard region).
    for (int k = 0; k < 2; ++k) {
        const Allocation* cand = nullptr;
        if (k == 0 && it != a.begin()) cand = &std::prev(it)->second;
        if (k == 1 && it != a.end()) cand = &it->second;
        if (!cand) continue;
        const uint64_t m0 = (uint64_t)(uintptr_t)cand->map, m1 = m0 + cand->map_bytes;
        if (p >= m0 && p < m1) return cand;
    }
    return nullptr;
}

std::string describe_locked(uint64_t p) {
    char buf[256];
    const Allocation* a = owner_of(p);
    if (!a) {
        snprintf(buf, sizeof buf, "0x%llx is not in any device allocation", (unsigned long long)p);
        return buf;
    }
    const uint64_t start = (uint64_t)(uintptr_t)(a->map + (a->map_bytes - page() - a->rounded));
    if (p >= start + a->bytes) {
        snprintf(buf, sizeof buf, "0x%llx is %llu bytes past the end of device allocation #%llu (%zu bytes at 0x%llx)",
                 (unsigned long long)p, (unsigned long long)(p - start - a->bytes), (unsigned long long)a->id, a->bytes,
                 (unsigned long long)start);
    } else if (p < start) {
        snprintf(buf, sizeof buf, "0x%llx is %llu bytes before the start of device allocation #%llu (%zu bytes at 0x%llx)",
                 (unsigned long long)p, (unsigned long long)(start - p), (unsigned long long)a->id, a->bytes,
                 (unsigned long long)start);
    } else {
        snprintf(buf, sizeof buf, "0x%llx is byte %llu of device allocation #%llu (%zu bytes)", (unsigned long long)p,
                 (unsigned long long)(p - start), (unsigned long long)a->id, a->bytes);
    }
    return buf;
}

}  // namespace

uint64_t device_alloc(size_t bytes) {
    const size_t rounded = ((bytes ? bytes : 1) + 255) / 256 * 256;
    const size_t body = (rounded + page() - 1) / page() * page();
    const size_t map_bytes = body + 2 * page();
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return 0;
    unsigned char* map = static_cast<unsigned char*>(m);
    mprotect(map, page(), PROT_NONE);
    mprotect(map + page() + body, page(), PROT_NONE);
    unsigned char* start = map + page() + body - rounded;
    memset(map + page(), kGuardByte, body - rounded);
    memset(start, kPoisonByte, bytes);
    memset(start + bytes, kGuardByte, rounded - bytes);
    std::lock_guard<std::mutex> g(mu());
    const uint64_t ptr = (uint64_t)(uintptr_t)start;
    allocs()[ptr] = Allocation{next_id++, bytes, rounded, map, map_bytes, map + page()};
    in_use += bytes;
    return ptr;
}

bool device_free(uint64_t ptr) {
    std::lock_guard<std::mutex> g(mu());
    auto it = allocs().find(ptr);
    if (it == allocs().end()) return false;
    in_use -= it->second.bytes;
    munmap(it->second.map, it->second.map_bytes);
    allocs().erase(it);
    return true;
}

bool device_range_ok(uint64_t p, size_t bytes, std::string* why) {
    std::lock_guard<std::mutex> g(mu());
    auto& a = allocs();
    auto it = a.upper_bound(p);
    if (it != a.begin()) {
        const auto& [start, al] = *std::prev(it);
        if (p >= start && p - start <= al.bytes && bytes <= al.bytes - (p - start)) return true;
    }
    if (why) {
        char buf[96];
        snprintf(buf, sizeof buf, "%zu bytes at 0x%llx: ", bytes, (unsigned long long)p);
        // Name the first byte that is out of range: p itself, or the end of the allocation p is in.
        uint64_t bad = p;
        if (it != a.begin()) {
            const auto& [start, al] = *std::prev(it);
            if (p >= start && p - start < al.bytes) bad = start + al.bytes;
        }
        *why = buf + describe_locked(bad);
    }
    return false;
}

std::string describe_address(uint64_t p) {
    std::lock_guard<std::mutex> g(mu());
    return describe_locked(p);
}

std::string check_guards() {
    std::lock_guard<std::mutex> g(mu());
    for (const auto& [start, a] : allocs()) {
        const unsigned char* s = (const unsigned char*)(uintptr_t)start;
        for (const unsigned char* q = a.lo; q < s; ++q)
            if (*q != kGuardByte) return describe_locked((uint64_t)(uintptr_t)q) + " was written (guard byte changed)";
        for (const unsigned char* q = s + a.bytes; q < s + a.rounded; ++q)
            if (*q != kGuardByte) return describe_locked((uint64_t)(uintptr_t)q) + " was written (guard byte changed)";
    }
    return "";
}

size_t device_bytes_in_use() {
    std::lock_guard<std::mutex> g(mu());
    return in_use;
}

void* host_alloc(size_t bytes) {
    void* p = malloc(bytes ? bytes : 1);
    if (!p) return nullptr;
    std::lock_guard<std::mutex> g(mu());
    pinned()[(uintptr_t)p] = bytes;
    return p;
}

bool host_free(void* p) {
    {
        std::lock_guard<std::mutex> g(mu());
        if (!pinned().erase((uintptr_t)p)) return false;
    }
    free(p);
    return true;
}

bool is_pinned_host(const void* p) {
    std::lock_guard<std::mutex> g(mu());
    auto& s = pinned();
    auto it = s.upper_bound((uintptr_t)p);
    if (it == s.begin()) return false;
    const auto& [start, bytes] = *std::prev(it);
    return (uintptr_t)p < start + bytes;
}

}  // namespace gsim
