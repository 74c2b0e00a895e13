// A plugin built twice with different PLUGIN_VERSION values: two builds of one
// library, for the test that a function reference names its build
// (spawn_test, CodeIdentity.ALibraryReplacedOnDiskIsRefusedBySpawnedWorkers).
extern "C" int plugin_add_version(int x) {
  return x + PLUGIN_VERSION;
}
