// Build tag of the extension: the source hash and the CPU capability it was compiled for.
//
// bertfast/_cpp.py reads the tag from a prebuilt bertfast._C *before* loading it (a plain
// string in the binary), so it can refuse a library built from other sources or for a CPU
// this machine does not have; once loaded, `bertfast::cpu_build_info()` returns the same tag.
#include <torch/library.h>

#include <string>

#ifndef BERTFAST_SOURCE_HASH
#define BERTFAST_SOURCE_HASH unknown
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif
#define BERTFAST_STR2(x) #x
#define BERTFAST_STR(x) BERTFAST_STR2(x)

extern "C" {
__attribute__((used)) const char bertfast_cpu_build_tag[] =
    "BERTFAST_BUILD_TAG source=" BERTFAST_STR(BERTFAST_SOURCE_HASH) " capability=" BERTFAST_STR(CPU_CAPABILITY) ";";
}

namespace {
std::string cpu_build_info() { return std::string(bertfast_cpu_build_tag); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(bertfast, m) { m.def("cpu_build_info() -> str", &cpu_build_info); }
