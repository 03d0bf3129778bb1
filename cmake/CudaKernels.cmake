# The CUDA kernels (csrc/kernels/cuda/*.cu): torch-free, so this object library neither links
# torch nor sees its headers or flags. Included from CMakeLists.txt once CUDA is enabled;
# defines the target aiaas_fast_cuda_kernels and AIAAS_FAST_HAVE_CUTLASS.
#
# CUTLASS (header-only) is looked for in: -DAIAAS_FAST_CUTLASS_INCLUDE_DIR or the environment
# variable of that name; the nvidia-cutlass Python package (cutlass_library/source/include);
# build/cutlass-headers/include (where scripts/check_cuda_kernels.sh unpacks it). Without it the
# linear_relu forward uses cuBLASLt / a plain product (csrc/cuda/glue.h), and says so here.
find_package(CUDAToolkit REQUIRED)

set(AIAAS_FAST_CUTLASS_INCLUDE_DIR "$ENV{AIAAS_FAST_CUTLASS_INCLUDE_DIR}" CACHE PATH
    "CUTLASS include directory (holding cutlass/ and cute/)")
set(_cutlass_candidates "${AIAAS_FAST_CUTLASS_INCLUDE_DIR}")
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); print(os.path.join(list(s.submodule_search_locations)[0], 'source', 'include') if s else '')"
  OUTPUT_VARIABLE _cutlass_from_python OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
list(APPEND _cutlass_candidates "${_cutlass_from_python}" "${CMAKE_CURRENT_SOURCE_DIR}/build/cutlass-headers/include")
set(AIAAS_FAST_HAVE_CUTLASS OFF)
foreach(_dir IN LISTS _cutlass_candidates)
  if(_dir AND EXISTS "${_dir}/cutlass/gemm/device/gemm.h")
    set(AIAAS_FAST_HAVE_CUTLASS ON)
    set(_cutlass_include "${_dir}")
    break()
  endif()
endforeach()

add_library(aiaas_fast_cuda_kernels OBJECT ${AIAAS_FAST_CUDA_KERNEL_SOURCES})
target_include_directories(aiaas_fast_cuda_kernels PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
target_compile_options(aiaas_fast_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr>)
if(AIAAS_FAST_HAVE_CUTLASS)
  target_include_directories(aiaas_fast_cuda_kernels SYSTEM PRIVATE "${_cutlass_include}")
  target_compile_definitions(aiaas_fast_cuda_kernels PRIVATE AIAAS_FAST_HAVE_CUTLASS=1)
  message(STATUS "aiaas_fast: CUTLASS headers: ${_cutlass_include}")
else()
  target_compile_definitions(aiaas_fast_cuda_kernels PRIVATE AIAAS_FAST_HAVE_CUTLASS=0)
  message(WARNING "aiaas_fast: no CUTLASS headers found (pip install nvidia-cutlass, or set "
    "AIAAS_FAST_CUTLASS_INCLUDE_DIR); linear_relu's forward on CUDA uses cuBLASLt / a plain product")
endif()
