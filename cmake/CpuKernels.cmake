# The CPU kernels hold no torch headers: plain loops the compiler vectorizes. The same
# source is compiled once per instruction set, each copy in its own namespace, and
# csrc/ops/cpu_dispatch.cpp picks one at run time from what the CPU supports.
# Sets AIAAS_FAST_CPU_KERNEL_OBJECTS (to add to the library) and AIAAS_FAST_CPU_ISAS.
set(_kernel_src "${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/cpu/kernels.cpp"
                "${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/cpu/mlp.cpp")
set(AIAAS_FAST_CPU_ISAS default)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
  list(APPEND AIAAS_FAST_CPU_ISAS avx2 avx512)
endif()
set(_flags_default "")
set(_flags_avx2 -mavx2 -mfma -mf16c)
set(_flags_avx512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mprefer-vector-width=512)
set(AIAAS_FAST_CPU_KERNEL_OBJECTS "")
foreach(isa IN LISTS AIAAS_FAST_CPU_ISAS)
  set(_obj aiaas_fast_cpu_kernels_${isa})
  add_library(${_obj} OBJECT ${_kernel_src})
  target_include_directories(${_obj} PRIVATE "${CMAKE_CURRENT_SOURCE_DIR}/csrc")
  target_compile_definitions(${_obj} PRIVATE AIAAS_FAST_ISA=${isa})
  target_compile_options(${_obj} PRIVATE -O3 -fno-math-errno -fno-trapping-math ${_flags_${isa}})
  list(APPEND AIAAS_FAST_CPU_KERNEL_OBJECTS $<TARGET_OBJECTS:${_obj}>)
endforeach()
