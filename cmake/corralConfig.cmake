# find_package(corral CONFIG): the imported target corral::corral. libcorral links its dependencies
# (OpenMP, the kernels, the CUDA runtime) privately, so a consumer needs nothing else.
include("${CMAKE_CURRENT_LIST_DIR}/corralTargets.cmake")
