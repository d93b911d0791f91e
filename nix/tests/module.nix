# Tests of nix/module.nix, for lib.runTests: the module is evaluated with nixpkgs'
# lib.evalModules beside stand-ins of the NixOS options it sets (stubs.nix) and a stand-in
# pkgs (pkgs.nix), and each test compares what it produced with what a NixOS machine must
# get. `module` is a parameter so that scripts/check-nix can show that a broken module
# fails them.
{
  lib,
  module ? ../module.nix,
}:
let
  pkgs = import ./pkgs.nix { inherit lib; };
  narflow = pkgs.narflow.outPath;

  eval =
    cfg:
    (lib.evalModules {
      modules = [
        ./stubs.nix
        module
        { _module.args.pkgs = pkgs; }
        { services.narflow = cfg; }
      ];
    }).config;

  # Everything set: two keys, an environment file, metrics on every address.
  full = eval {
    enable = true;
    to = "s3://cache?region=eu-west-1&endpoint=http://127.0.0.1:3900";
    secretKeyFiles = [
      "/run/keys/cache-1.sec"
      "/run/keys/cache-2.sec"
    ];
    environmentFile = "/run/keys/narflow.env";
    watchStore = "all";
    uploadLogs = true;
    metricsListen = "0.0.0.0:9464";
    openFirewall = true;
    settings = {
      memory = "256M";
      s3.concurrency = 16;
    };
  };
  fullUnit = full.systemd.services.narflow;
  fullConfigFile = full.environment.etc."narflow/narflow.toml".source;

  # The least that starts: a file:// cache, unsigned.
  minimal = eval {
    enable = true;
    to = "file:///var/cache/nix";
    unsigned = true;
  };
  minimalUnit = minimal.systemd.services.narflow;

  # The positions of the assertions that fail in a configuration.
  failing =
    config:
    lib.filter (i: !(builtins.elemAt config.assertions i).assertion) (
      lib.range 0 (lib.length config.assertions - 1)
    );
  failingMessages =
    config: map (i: (builtins.elemAt config.assertions i).message) (failing config);

  # One configuration per mistake, with a word its message must name.
  mistakes = {
    noKey = {
      cfg = {
        enable = true;
        to = "s3://cache";
      };
      names = "no signing key";
    };
    keyInStore = {
      cfg = {
        enable = true;
        to = "s3://cache";
        secretKeyFiles = [ "/nix/store/00000000000000000000000000000000-source/cache.sec" ];
      };
      names = "is in the Nix store";
    };
    environmentFileInStore = {
      cfg = {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        environmentFile = "/nix/store/00000000000000000000000000000000-narflow.env";
      };
      names = "keep S3 credentials outside it";
    };
    notACacheUrl = {
      cfg = {
        enable = true;
        to = "/var/cache/nix";
        unsigned = true;
      };
      names = "is not a cache URL";
    };
    secretKeyInUrl = {
      cfg = {
        enable = true;
        to = "s3://cache?secret-key=/etc/nix/key.sec";
      };
      # The URL's key is not counted: the missing key fires too.
      also = [ "no signing key" ];
      names = "the URL's secret-key=";
    };
    keyFileInSettings = {
      cfg = {
        enable = true;
        to = "s3://cache";
        secretKeyFiles = [ "/run/keys/cache.sec" ];
        settings.key-file = [ "/run/keys/other.sec" ];
      };
      names = "settings.key-file";
    };
    stateDirMoved = {
      cfg = {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        settings.state-dir = "/srv/narflow";
      };
      names = "RuntimeDirectory= and StateDirectory=";
    };
    uploadJournalFile = {
      cfg = {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        settings.upload-journal = "/var/lib/narflow/uploads.sqlite";
      };
      names = "records unfinished uploads in its queue";
    };
    firewallWithoutMetrics = {
      cfg = {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        openFirewall = true;
      };
      names = "no port to open";
    };
    metricsWithoutPort = {
      cfg = {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        metricsListen = "localhost";
      };
      names = "is not HOST:PORT";
    };
  };
  fired = lib.mapAttrs (_: m: failingMessages (eval m.cfg)) mistakes;
in
{
  testExecStart = {
    expr = fullUnit.serviceConfig.ExecStart;
    expected = "${narflow}/bin/narflow daemon --config ${fullConfigFile} --key-file=%d/secret-key-0 --key-file=%d/secret-key-1";
  };
  testExecStartWithoutKeys = {
    expr = minimalUnit.serviceConfig.ExecStart;
    expected = "${narflow}/bin/narflow daemon --config ${minimal.environment.etc."narflow/narflow.toml".source}";
  };
  # The daemon reads (testExecStart) the file the hook and `narflow config` read.
  testConfigFileIsTheEtcFile = {
    expr = lib.hasSuffix "-narflow.toml" fullConfigFile;
    expected = true;
  };
  testCredentials = {
    expr = fullUnit.serviceConfig.LoadCredential;
    expected = [
      "secret-key-0:/run/keys/cache-1.sec"
      "secret-key-1:/run/keys/cache-2.sec"
    ];
  };
  # A path literal names the file where it is; it is never copied into the store.
  testKeyPathLiteralStaysOutOfTheStore = {
    expr =
      (eval {
        enable = true;
        to = "s3://cache";
        secretKeyFiles = [ /run/keys/cache.sec ];
      }).systemd.services.narflow.serviceConfig.LoadCredential;
    expected = [ "secret-key-0:/run/keys/cache.sec" ];
  };
  testEnvironmentFile = {
    expr = [
      fullUnit.serviceConfig.EnvironmentFile
      minimalUnit.serviceConfig.EnvironmentFile
    ];
    expected = [
      [ "/run/keys/narflow.env" ]
      [ ]
    ];
  };
  testHardening = {
    expr = lib.getAttrs [
      "User"
      "RuntimeDirectory"
      "StateDirectory"
      "StateDirectoryMode"
      "ProtectSystem"
      "ReadWritePaths"
      "ReadOnlyPaths"
      "ProtectHome"
      "PrivateTmp"
      "NoNewPrivileges"
      "ProtectKernelTunables"
      "ProtectKernelModules"
      "ProtectControlGroups"
      "RestrictAddressFamilies"
      "LockPersonality"
      "ProtectKernelLogs"
      "ProtectClock"
      "ProtectHostname"
      "RestrictNamespaces"
      "RestrictRealtime"
      "RestrictSUIDSGID"
      "SystemCallArchitectures"
    ] fullUnit.serviceConfig;
    expected = {
      User = "root";
      RuntimeDirectory = "narflow";
      StateDirectory = "narflow";
      StateDirectoryMode = "0700";
      ProtectSystem = "strict";
      ReadWritePaths = [ "/nix/var/nix/db" ];
      ReadOnlyPaths = [
        "/nix/var/nix/db/db.sqlite"
        "/nix/var/nix/db/schema"
        "-/nix/var/nix/db/big-lock"
        "-/nix/var/nix/db/reserved"
      ];
      ProtectHome = "read-only";
      PrivateTmp = true;
      NoNewPrivileges = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectControlGroups = true;
      RestrictAddressFamilies = [
        "AF_UNIX"
        "AF_INET"
        "AF_INET6"
      ];
      LockPersonality = true;
      ProtectKernelLogs = true;
      ProtectClock = true;
      ProtectHostname = true;
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      SystemCallArchitectures = "native";
    };
  };
  testStopAndRestart = {
    expr = lib.getAttrs [
      "KillSignal"
      "TimeoutStopSec"
      "Restart"
      "RestartSec"
    ] fullUnit.serviceConfig;
    expected = {
      KillSignal = "SIGTERM";
      TimeoutStopSec = 90;
      Restart = "always";
      RestartSec = 2;
    };
  };
  # A file:// cache is the one other directory the daemon writes.
  testFileCacheIsWritable = {
    expr = minimalUnit.serviceConfig.ReadWritePaths;
    expected = [
      "/nix/var/nix/db"
      "/var/cache/nix"
    ];
  };
  testUnitOrder = {
    expr = {
      inherit (fullUnit) wantedBy after wants;
    };
    expected = {
      wantedBy = [ "multi-user.target" ];
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      wants = [ "network-online.target" ];
    };
  };
  testHookLine = {
    expr = full.nix.settings.post-build-hook;
    expected = "${narflow}/bin/narflow-hook";
  };
  testHookCanBeLeftOut = {
    expr =
      (eval {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        postBuildHook = false;
      }).nix.settings ? post-build-hook;
    expected = false;
  };
  testRenderedToml = {
    expr = builtins.readFile fullConfigFile;
    expected = ''
      memory = "256M"
      socket = "/run/narflow/daemon.sock"
      state-dir = "/var/lib/narflow"
      to = "s3://cache?region=eu-west-1&endpoint=http://127.0.0.1:3900"
      upload-logs = true

      [daemon]
      metrics-listen = "0.0.0.0:9464"
      watch-store = "all"

      [s3]
      concurrency = 16
    '';
  };
  testRenderedTomlMinimal = {
    expr = builtins.readFile minimal.environment.etc."narflow/narflow.toml".source;
    expected = ''
      socket = "/run/narflow/daemon.sock"
      state-dir = "/var/lib/narflow"
      to = "file:///var/cache/nix"
      unsigned = true
    '';
  };
  testFirewall = {
    expr = [
      full.networking.firewall.allowedTCPPorts
      minimal.networking.firewall.allowedTCPPorts
      (eval {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        metricsListen = "[::]:9100";
        openFirewall = true;
      }).networking.firewall.allowedTCPPorts
    ];
    expected = [
      [ 9464 ]
      [ ]
      [ 9100 ]
    ];
  };
  testLoopbackFirewallWarns = {
    expr =
      (eval {
        enable = true;
        to = "s3://cache";
        unsigned = true;
        metricsListen = "127.0.0.1:9464";
        openFirewall = true;
      }).warnings;
    expected = [
      "services.narflow.openFirewall: the metrics listen on loopback (127.0.0.1:9464), which the firewall does not filter; opening port 9464 lets nothing in."
    ];
  };
  testPackageOnPath = {
    expr = map (p: p.outPath) full.environment.systemPackages;
    expected = [ narflow ];
  };
  testDisabledSetsNothing = {
    expr =
      let
        c = eval { to = "s3://cache"; };
      in
      {
        services = c.systemd.services;
        nix = c.nix.settings;
        etc = c.environment.etc;
        assertions = c.assertions;
      };
    expected = {
      services = { };
      nix = { };
      etc = { };
      assertions = [ ];
    };
  };
  testValidConfigurationsPassEveryAssertion = {
    expr = [
      (failingMessages full)
      (failingMessages minimal)
    ];
    expected = [
      [ ]
      [ ]
    ];
  };
  # Each mistake fires its own assertion (and no other, unless listed).
  testEachMistakeFiresItsAssertion = {
    expr = lib.mapAttrs (
      name: messages:
      map (
        words:
        let
          matching = lib.filter (lib.hasInfix words) messages;
        in
        lib.length matching == 1
      ) ([ mistakes.${name}.names ] ++ mistakes.${name}.also or [ ])
      ++ [ (lib.length messages == 1 + lib.length (mistakes.${name}.also or [ ])) ]
    ) fired;
    expected = lib.mapAttrs (
      _: m:
      lib.genList (_: true) (2 + lib.length (m.also or [ ]))
    ) mistakes;
  };
  # And every assertion the module declares has a mistake above that fires it.
  testEveryAssertionHasAMistake = {
    expr = lib.sort lib.lessThan (
      lib.unique (lib.concatMap (m: failing (eval m.cfg)) (lib.attrValues mistakes))
    );
    expected = lib.range 0 (lib.length full.assertions - 1);
  };
}
