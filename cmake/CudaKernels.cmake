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

# The Hopper GEMM (CUTLASS 3.x: wgmma, TMA) builds for sm_90a alone, in its own object library;
# everything else for CMAKE_CUDA_ARCHITECTURES.
set(_sm90_source "${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/cuda/linear_relu_gemm_sm90.cu")
list(REMOVE_ITEM AIAAS_FAST_CUDA_KERNEL_SOURCES "${_sm90_source}")
add_library(aiaas_fast_cuda_kernels OBJECT ${AIAAS_FAST_CUDA_KERNEL_SOURCES})
target_include_directories(aiaas_fast_cuda_kernels PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
target_compile_options(aiaas_fast_cuda_kernels PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr>)
set(AIAAS_FAST_BUILT_WITH_CUTLASS ${AIAAS_FAST_HAVE_CUTLASS})  # for build_info()
if(AIAAS_FAST_HAVE_CUTLASS)
  target_include_directories(aiaas_fast_cuda_kernels SYSTEM PRIVATE "${_cutlass_include}")
  target_compile_definitions(aiaas_fast_cuda_kernels PRIVATE AIAAS_FAST_HAVE_CUTLASS=1)
  message(STATUS "aiaas_fast: CUTLASS headers: ${_cutlass_include}")
else()
  target_compile_definitions(aiaas_fast_cuda_kernels PRIVATE AIAAS_FAST_HAVE_CUTLASS=0)
  message(WARNING "aiaas_fast: no CUTLASS headers found (pip install nvidia-cutlass, or set "
    "AIAAS_FAST_CUTLASS_INCLUDE_DIR); linear_relu's forward on CUDA uses cuBLASLt / a plain product")
endif()

# sm_90a where the build includes architecture 90 (any form: 90, 90-real, 90a) and CUTLASS is
# here; otherwise the file compiles to stubs (have_cutlass_sm90_gemm() false) like the others.
# -DNDEBUG also in debug builds: CUTLASS's asserts in the mainloop split it into calls, and
# ptxas then serializes the wgmma pipeline (warning C7510).
add_library(aiaas_fast_cuda_sm90 OBJECT "${_sm90_source}")
target_include_directories(aiaas_fast_cuda_sm90 PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
if(AIAAS_FAST_HAVE_CUTLASS AND CMAKE_CUDA_ARCHITECTURES MATCHES "(^|;)90")
  set_target_properties(aiaas_fast_cuda_sm90 PROPERTIES CUDA_ARCHITECTURES OFF)
  target_compile_options(aiaas_fast_cuda_sm90 PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 -DNDEBUG --expt-relaxed-constexpr -gencode=arch=compute_90a,code=sm_90a>)
  target_include_directories(aiaas_fast_cuda_sm90 SYSTEM PRIVATE "${_cutlass_include}")
  target_compile_definitions(aiaas_fast_cuda_sm90 PRIVATE AIAAS_FAST_HAVE_CUTLASS_SM90=1)
  list(APPEND AIAAS_FAST_CUDA_ARCHS "90a")
  list(REMOVE_DUPLICATES AIAAS_FAST_CUDA_ARCHS)
  message(STATUS "aiaas_fast: the Hopper CUTLASS GEMM builds for sm_90a")
else()
  target_compile_options(aiaas_fast_cuda_sm90 PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-O3>)
  target_compile_definitions(aiaas_fast_cuda_sm90 PRIVATE AIAAS_FAST_HAVE_CUTLASS_SM90=0)
endif()
