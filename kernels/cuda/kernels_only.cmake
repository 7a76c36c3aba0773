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

# HELIX_DEVICE_ENGINE=ON adds engine/ (the engine on the CUDA backend, its tests and
# tests/bench) with the few libraries it needs (Gloo, UCX, nlohmann-json and theirs) taken from
# Debian packages unpacked under HELIX_DEPS_ROOT (tests/gpu/run_all.sh says how to make it):
# the GPU machine has no package manager access. Their CMake files name /usr, so the imported
# targets are made here.
option(HELIX_DEVICE_ENGINE "Kernels-only build: also build engine/ from HELIX_DEPS_ROOT" OFF)
if(HELIX_DEVICE_ENGINE)
  set(HELIX_DEPS_ROOT "${CMAKE_SOURCE_DIR}/.devdeps/root" CACHE PATH
      "Root the Debian packages of the device engine build are unpacked under")
  set(_usr ${HELIX_DEPS_ROOT}/usr)
  set(_arch ${_usr}/lib/x86_64-linux-gnu)
  foreach(_f ${_usr}/lib/libgloo.so.0 ${_arch}/libucp.so.0 ${_usr}/include/nlohmann/json.hpp)
    if(NOT EXISTS ${_f})
      message(FATAL_ERROR "HELIX_DEVICE_ENGINE: ${_f} is missing (HELIX_DEPS_ROOT=${HELIX_DEPS_ROOT})")
    endif()
  endforeach()
  add_library(gloo SHARED IMPORTED GLOBAL)
  set_target_properties(gloo PROPERTIES IMPORTED_LOCATION ${_usr}/lib/libgloo.so.0
                        INTERFACE_INCLUDE_DIRECTORIES ${_usr}/include)
  foreach(_lib ucp ucs uct)
    add_library(ucx::${_lib} SHARED IMPORTED GLOBAL)
    set_target_properties(ucx::${_lib} PROPERTIES IMPORTED_LOCATION ${_arch}/lib${_lib}.so.0
                          INTERFACE_INCLUDE_DIRECTORIES ${_usr}/include)
  endforeach()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED GLOBAL)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
                        INTERFACE_INCLUDE_DIRECTORIES ${_usr}/include)
  # The libraries' own dependencies (hiredis, ibverbs, libnl, numa) are found at link and run
  # time through these directories.
  set(_rpath ${_usr}/lib ${_arch} ${HELIX_DEPS_ROOT}/lib/x86_64-linux-gnu)
  string(REPLACE ";" ":" _rpath_link "${_rpath}")
  add_link_options("LINKER:-rpath-link,${_rpath_link}")
  set(CMAKE_BUILD_RPATH ${_rpath})
  get_filename_component(_shared_default "${CMAKE_SOURCE_DIR}/../shared" ABSOLUTE)
  set(HELIX_SHARED_DIR "${_shared_default}" CACHE PATH "The shared/ folder with test models")
  set(HELIX_PYTHON python3 CACHE FILEPATH "Python for the tests' model writers")
  add_subdirectory(engine)
  if(HELIX_BUILD_BENCHMARKS)
    add_executable(decode_bench tests/bench/decode_bench.cc)
    target_link_libraries(decode_bench PRIVATE helix_engine)
  endif()
  message(STATUS "Helix: device engine build from ${HELIX_DEPS_ROOT}")
endif()
