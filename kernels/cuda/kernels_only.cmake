# Included by the top-level CMakeLists.txt when HELIX_KERNELS_ONLY=ON (the lent GPU machine,
# which has nvcc, CMake and Python but none of the Debian packages): builds kernels/ (CPU
# reference + CUDA), their tests and tests/gpu, and looks for nothing but Threads and GTest.

find_package(Threads REQUIRED)

if(HELIX_BUILD_TESTS)
  # GoogleTest from source when a source tree is at hand (.devdeps carries the Debian
  # googletest sources): static libraries built on another distribution may not link.
  set(_gtest_src_default "")
  if(EXISTS "${CMAKE_SOURCE_DIR}/.devdeps/root/usr/src/googletest/CMakeLists.txt")
    set(_gtest_src_default "${CMAKE_SOURCE_DIR}/.devdeps/root/usr/src/googletest")
  endif()
  set(HELIX_GTEST_SOURCE_DIR "${_gtest_src_default}" CACHE PATH
      "GoogleTest source tree to build (kernels-only builds); empty: find_package(GTest)")
  if(HELIX_GTEST_SOURCE_DIR)
    set(BUILD_GMOCK OFF CACHE BOOL "" FORCE)
    set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
    add_subdirectory(${HELIX_GTEST_SOURCE_DIR} ${CMAKE_BINARY_DIR}/_googletest EXCLUDE_FROM_ALL)
    message(STATUS "Helix kernels-only: GoogleTest built from ${HELIX_GTEST_SOURCE_DIR}")
  else()
    find_package(GTest CONFIG REQUIRED)
  endif()
  enable_testing()
endif()

# Same contract as the top-level helix_add_test (which this build never reaches).
function(helix_add_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main)
  add_test(NAME ${name} COMMAND ${name})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
  endif()
  set(labels unit ${T_LABELS})
  set_tests_properties(${name} PROPERTIES TIMEOUT ${T_TIMEOUT} LABELS "${labels}"
    ENVIRONMENT "HELIX_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
endfunction()

# helix_common as engine/CMakeLists.txt defines it (status + log facade; no third-party
# library), without the rest of engine/.
add_library(helix_common engine/common/status.cc engine/common/log.cc)
target_include_directories(helix_common PUBLIC ${CMAKE_SOURCE_DIR} ${CMAKE_BINARY_DIR}/generated)
target_link_libraries(helix_common PUBLIC Threads::Threads)

add_subdirectory(kernels)
message(STATUS "Helix: kernels-only build (HELIX_KERNELS_ONLY=ON)")
