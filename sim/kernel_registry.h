// The simulated device: how a host-compiled kernel is described to the runtime. The generated
// registration unit of each kernels/<module>.cu (scripts/sim-build.sh, sim/gen_registry.py)
// lists its `extern "C" __global__` entry points with GSIM_KERNEL; a launch unpacks the driver's
// `void** kernelParams` into the entry's typed parameters, each thread getting its own copy as
// the parameter space gives every CUDA thread.
#pragma once

#include <stddef.h>

#include <type_traits>
#include <utility>

namespace gsim {

using Thunk = void (*)(void* const* params);

struct KernelInfo {
    const char* module;  // file stem of kernels/*.cu
    const char* name;    // the entry point's (unmangled) name
    Thunk thunk;
    int nparams;
    const size_t* param_sizes;
    const size_t* param_aligns;
    int max_threads;  // __launch_bounds__ maximum, else 1024
};

template <auto F>
struct KernelTraits;

template <typename... A, void (*F)(A...)>
struct KernelTraits<F> {
    static constexpr int nparams = (int)sizeof...(A);
    static constexpr size_t sizes[sizeof...(A) + 1] = {sizeof(std::decay_t<A>)..., 0};
    static constexpr size_t aligns[sizeof...(A) + 1] = {alignof(std::decay_t<A>)..., 0};
    static void call(void* const* params) { call_with(params, std::index_sequence_for<A...>{}); }
    template <size_t... I>
    static void call_with(void* const* params, std::index_sequence<I...>) {
        F(*static_cast<std::decay_t<A>*>(params[I])...);
    }
};

}  // namespace gsim

#define GSIM_KERNEL(module, fn, max_threads)                                                     \
    gsim::KernelInfo {                                                                          \
        module, #fn, &gsim::KernelTraits<&fn>::call, gsim::KernelTraits<&fn>::nparams,           \
            gsim::KernelTraits<&fn>::sizes, gsim::KernelTraits<&fn>::aligns, (int)(max_threads) \
    }

// Dynamic shared memory (`extern __shared__ T name[];`): one thread-local array per name, as
// large as the device's opt-in maximum; a launch may use its first `sharedMemBytes` bytes.
#define GSIM_MAX_DYNAMIC_SMEM (227 * 1024)
