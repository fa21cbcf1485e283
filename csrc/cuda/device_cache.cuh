// Per-device answers of the CUDA queries the launchers need (compute capability, SM count,
// opt-in shared memory per block) and of "this kernel's dynamic shared memory limit is
// raised on this device": asked once per device and process instead of on every launch.
// Thread-safe; a failed query is not cached (the next call asks again and reports it).
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <utility>
#include <vector>

namespace gla {

struct DeviceInfo {
  int major = 0;
  int sm_count = 0;
  int smem_optin = 0;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
};

namespace device_cache {
constexpr int kMaxDevices = 64;
inline std::mutex& lock() {
  static std::mutex m;
  return m;
}
inline DeviceInfo* infos() {
  static DeviceInfo table[kMaxDevices];
  return table;
}
inline bool* known() {
  static bool table[kMaxDevices] = {};
  return table;
}
inline std::vector<std::pair<const void*, int>>& raised() {  // (kernel, device) pairs
  static std::vector<std::pair<const void*, int>> v;
  return v;
}
struct Resident {
  const void* kernel;
  int device, threads, smem, blocks;
};
inline std::vector<Resident>& resident() {
  static std::vector<Resident> v;
  return v;
}
}  // namespace device_cache

// The current device and its DeviceInfo; cudaSuccess or the error of the first failed query.
inline cudaError_t current_device_info(int* device, DeviceInfo* info) {
  cudaError_t err = cudaGetDevice(device);  // host-side, no driver round trip
  if (err != cudaSuccess) return err;
  const int d = *device;
  if (d >= 0 && d < device_cache::kMaxDevices) {
    std::lock_guard<std::mutex> guard(device_cache::lock());
    if (device_cache::known()[d]) {
      *info = device_cache::infos()[d];
      return cudaSuccess;
    }
  }
  DeviceInfo fresh;
  err = cudaDeviceGetAttribute(&fresh.major, cudaDevAttrComputeCapabilityMajor, d);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&fresh.sm_count, cudaDevAttrMultiProcessorCount, d);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&fresh.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d);
  if (err != cudaSuccess) return err;
  *info = fresh;
  if (d >= 0 && d < device_cache::kMaxDevices) {
    std::lock_guard<std::mutex> guard(device_cache::lock());
    device_cache::infos()[d] = fresh;
    device_cache::known()[d] = true;
  }
  return cudaSuccess;
}

// Raises kernel's dynamic shared memory limit to smem on the current device, once per
// (kernel, device): each kernel is always launched with the same constexpr smem size.
inline cudaError_t raise_smem_once(const void* kernel, int smem) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  {
    std::lock_guard<std::mutex> guard(device_cache::lock());
    for (const auto& kd : device_cache::raised())
      if (kd.first == kernel && kd.second == device) return cudaSuccess;
  }
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> guard(device_cache::lock());
  device_cache::raised().emplace_back(kernel, device);
  return cudaSuccess;
}

// How many blocks of kernel (threads per block, smem dynamic shared memory bytes) one SM holds
// at once on the current device, asked once per (kernel, device, threads, smem). Raises the
// kernel's shared memory limit first (raise_smem_once): the occupancy API counts 0 blocks for
// a kernel whose limit is below smem.
inline cudaError_t resident_blocks_once(const void* kernel, int threads, int smem, int* blocks) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  {
    std::lock_guard<std::mutex> guard(device_cache::lock());
    for (const auto& r : device_cache::resident())
      if (r.kernel == kernel && r.device == device && r.threads == threads && r.smem == smem) {
        *blocks = r.blocks;
        return cudaSuccess;
      }
  }
  err = raise_smem_once(kernel, smem);
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, smem);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> guard(device_cache::lock());
  device_cache::resident().push_back({kernel, device, threads, smem, *blocks});
  return cudaSuccess;
}

}  // namespace gla
