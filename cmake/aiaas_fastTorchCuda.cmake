# Included before find_package(Torch), by this project and by the installed aiaas_fastConfig.cmake.
#
# A CUDA build of torch makes its CMake config look for the CUDA toolkit with the legacy
# FindCUDA, which takes the toolkit's root from the nvcc on PATH. Two cases break it:
# - nvcc on PATH is a wrapper script (/usr/local/bin/nvcc running /usr/local/cuda-X/bin/nvcc):
#   FindCUDA looks in /usr/local and stops. CMake's own FindCUDAToolkit finds the real root
#   (or enable_language(CUDA) already did): hand that to FindCUDA.
# - there is no toolkit at all (the usual pip install of torch on a machine without nvcc):
#   torch's config stops with "cannot find the CUDA libraries", though linking torch needs
#   none of it. torch::cudart is that lookup's include guard and the only CUDA target torch's
#   own targets link: an empty one lets a CPU-only build go on.
if(_aiaas_fast_torch_cuda_done OR TARGET torch::cudart)
  return()
endif()
set(_aiaas_fast_torch_cuda_done ON)
if(NOT CUDAToolkit_FOUND)
  find_package(CUDAToolkit QUIET)
endif()
if(CUDAToolkit_FOUND AND CUDAToolkit_BIN_DIR)
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    get_filename_component(CUDA_TOOLKIT_ROOT_DIR "${CUDAToolkit_BIN_DIR}" DIRECTORY)
  endif()
else()
  message(STATUS "aiaas_fast: torch was built with CUDA, but no CUDA toolkit is here: linking torch without it")
  add_library(torch::cudart INTERFACE IMPORTED)
endif()
