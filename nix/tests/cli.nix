# What scripts/check-nix gives the real narflow binary: the unit's command line and
# credentials and the config file for a configuration using every typed option, to
# check that the daemon takes them (every flag exists, every file key is known, the
# credentials' keys load).
{
  lib,
  module ? ../module.nix,
}:
let
  config =
    (lib.evalModules {
      modules = [
        ./stubs.nix
        module
        { _module.args.pkgs = import ./pkgs.nix { inherit lib; }; }
        {
          services.narflow = {
            enable = true;
            to = "file:///var/cache/narflow-check";
            secretKeyFiles = [
              "/run/keys/check-1.sec"
              "/run/keys/check-2.sec"
            ];
            watchStore = "built";
            uploadLogs = true;
            metricsListen = "127.0.0.1:0";
            settings = {
              memory = "64M";
              daemon.shutdown-timeout = 5;
              hook.timeout = 1;
            };
          };
        }
      ];
    }).config;
  service = config.systemd.services.narflow.serviceConfig;
in
{
  package = (import ./pkgs.nix { inherit lib; }).narflow.outPath;
  execStart = service.ExecStart;
  credentials = service.LoadCredential;
  configFile = config.environment.etc."narflow/narflow.toml".source;
  hook = config.nix.settings.post-build-hook;
}
