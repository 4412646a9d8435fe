// The simulated device, host side: what sim/runtime.cpp (block execution) offers
// sim/driver.cpp (the CUDA driver API) and what sim/memory.cpp (device allocations) offers both.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "glimpse_sim.h"
#include "kernel_registry.h"

namespace gsim {

// ---- device memory (memory.cpp) -------------------------------------------------------------

// Allocates `bytes` of simulated device memory: 256-byte aligned, contents poisoned (0xff bytes:
// NaN as fp16/fp32), an inaccessible page right after the 256-byte-rounded end and before the
// start, and guard bytes in between that are checked after every launch. Returns 0 when out of
// memory.
uint64_t device_alloc(size_t bytes);
// Frees an allocation made by device_alloc; false when `ptr` is not the start of one.
bool device_free(uint64_t ptr);
// Whether [p, p+bytes) lies inside one live device allocation. On failure `why` says where the
// range falls (which allocation it overruns, by how much).
bool device_range_ok(uint64_t p, size_t bytes, std::string* why);
// Describes an address for a fault message.
std::string describe_address(uint64_t p);
// Checks the guard bytes of every allocation; returns "" or a message naming the allocation and
// the first corrupted offset.
std::string check_guards();
size_t device_bytes_in_use();

// Pinned host memory (cuMemHostAlloc): its copies run when the stream reaches them.
void* host_alloc(size_t bytes);
bool host_free(void* p);
bool is_pinned_host(const void* p);

// ---- kernels and launches (runtime.cpp) -----------------------------------------------------

// The kernels library (libglimpse_sim_kernels.so beside the driver library); loads it on first
// use. Returns nullptr and sets `why` when it cannot be loaded.
const KernelInfo* find_kernel(const char* name, std::string* why);

struct LaunchConfig {
    dim3 grid;
    dim3 block;
    unsigned dynamic_smem;
    unsigned max_dynamic_smem;  // the function's MAX_DYNAMIC_SHARED_SIZE_BYTES attribute
};

// Runs every block of a launch to completion on the calling OS thread. Returns 0 (CUDA_SUCCESS)
// or the CUresult a GPU would give; `error` then says what happened, naming the kernel.
int run_kernel(const KernelInfo& k, const LaunchConfig& cfg, void* const* params, std::string* error);

// Scheduling options from the environment (GLIMPSE_SIM_SCHED, GLIMPSE_SIM_SEED).
void describe_schedule(std::string* out);

}  // namespace gsim
