# services.narflow: the narflow daemon as a hardened systemd unit, the config file it and
# narflow-hook read (/etc/narflow/narflow.toml), and nix.conf's post-build-hook.
#
# The typed options are written into the config file, so that `narflow config`, `status`,
# `verify` and `gc` run by hand on the machine see what the daemon sees. Only the secret
# key files are given on the command line: systemd hands them to the unit as credentials
# (LoadCredential=, readable by the unit alone) and `%d` is their directory,
# $CREDENTIALS_DIRECTORY.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    types
    ;
  cfg = config.services.narflow;
  settingsFormat = pkgs.formats.toml { };

  # The unit's RuntimeDirectory= and StateDirectory=, and narflow's and narflow-hook's
  # defaults: the hook finds the daemon there with no setting of its own.
  socket = "/run/narflow/daemon.sock";
  stateDir = "/var/lib/narflow";

  configFile = settingsFormat.generate "narflow.toml" cfg.settings;

  inStore = p: lib.hasPrefix "${builtins.storeDir}/" (toString p);

  # Credential names: secret-key-0, secret-key-1, ... in the order given.
  keyCredentials = lib.imap0 (i: file: {
    name = "secret-key-${toString i}";
    file = toString file;
  }) cfg.secretKeyFiles;

  # A file:// cache is a directory the daemon writes: the one path outside its own state
  # that ProtectSystem=strict must leave writable.
  fileCacheDir =
    let
      rest = lib.removePrefix "file://" cfg.to;
    in
    if lib.hasPrefix "file://" cfg.to then builtins.head (lib.splitString "?" rest) else null;

  # The port of "HOST:PORT" or "[V6]:PORT".
  metricsPort =
    if cfg.metricsListen == null then
      null
    else
      lib.toInt (lib.last (lib.splitString ":" cfg.metricsListen));
  metricsOnLoopback =
    cfg.metricsListen != null
    && (lib.hasPrefix "127." cfg.metricsListen || lib.hasPrefix "[::1]:" cfg.metricsListen);

  settingsGiven = name: lib.hasAttrByPath (lib.splitString "." name) cfg.settings;
  settingsValue = name: lib.attrByPath (lib.splitString "." name) null cfg.settings;
in
{
  options.services.narflow = {
    enable = mkEnableOption "narflow, which uploads what Nix builds here to a binary cache";

    package = mkPackageOption pkgs "narflow" { };

    to = mkOption {
      type = types.str;
      example = "s3://my-cache?region=eu-west-1";
      description = ''
        The cache, in Nix's store-URL syntax (`s3://BUCKET?region=..&endpoint=..` or
        `file:///DIR`); the config file's `to`. Give the signing key with
        {option}`services.narflow.secretKeyFiles`, not the URL's `secret-key=`.
      '';
    };

    secretKeyFiles = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = [ "/run/keys/cache.example.org-1.sec" ];
      description = ''
        Secret key files (made by `nix-store --generate-binary-cache-key`) to sign narinfos
        with. Give them as strings of paths outside the Nix store (a path literal in a flake
        is copied into the world-readable store). systemd passes each to the unit as a
        credential readable by the unit alone; the files themselves may stay mode 0600
        root.
      '';
    };

    unsigned = mkOption {
      type = types.bool;
      default = false;
      description = "Upload narinfos unsigned when no key is given (refused otherwise).";
    };

    environmentFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/narflow.env";
      description = ''
        A file of `NAME=value` lines for the unit's environment (systemd's
        EnvironmentFile=): S3 credentials, `AWS_ACCESS_KEY_ID=...` and
        `AWS_SECRET_ACCESS_KEY=...` (or `AWS_PROFILE=...`). Keep it outside the Nix store,
        mode 0600.
      '';
    };

    watchStore = mkOption {
      type = types.nullOr (
        types.enum [
          "built"
          "all"
        ]
      );
      default = null;
      description = ''
        Follow the Nix database and queue each path that becomes valid: `built` (built on
        this machine, also when the post-build hook missed it) or `all` (substituted, added
        and copied-in paths too); off when null. The config file's `[daemon] watch-store`.
      '';
    };

    uploadLogs = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Upload each uploaded path's build log as `log/<drv name>`, so
        `nix log --store URL PATH` finds it.
      '';
    };

    metricsListen = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9464";
      description = ''
        Serve Prometheus metrics at `http://ADDR/metrics` (`HOST:PORT`, or `[V6]:PORT`); none
        when null. The metrics name store paths and the cache: keep it on loopback unless
        the scraper is elsewhere.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the metrics port (from {option}`services.narflow.metricsListen`) in the firewall.";
    };

    postBuildHook = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Set nix.conf's `post-build-hook` to `narflow-hook`, which hands every build's outputs
        to the daemon (or its spool, when the daemon is down) and never fails a build.
      '';
    };

    settings = mkOption {
      type = types.submodule { freeformType = settingsFormat.type; };
      default = { };
      example = {
        memory = "256M";
        max-rate = "50M";
        s3.concurrency = 16;
      };
      description = ''
        Everything else in narflow's config file (TOML; keys are the long flag names, in
        their tables: `[daemon]`, `[s3]`, `[hook]`, `[gc]`), rendered to
        /etc/narflow/narflow.toml. The options above fill in `to`, `unsigned`,
        `upload-logs`, `[daemon] watch-store` and `metrics-listen`, `socket` and
        `state-dir`. It is world-readable: no secrets here.
      '';
    };
  };

  config = mkIf cfg.enable {
    services.narflow.settings = lib.mkMerge [
      {
        to = cfg.to;
        socket = lib.mkDefault socket;
        state-dir = lib.mkDefault stateDir;
      }
      (mkIf cfg.unsigned { unsigned = true; })
      (mkIf cfg.uploadLogs { upload-logs = true; })
      (mkIf (cfg.watchStore != null) { daemon.watch-store = cfg.watchStore; })
      (mkIf (cfg.metricsListen != null) { daemon.metrics-listen = cfg.metricsListen; })
    ];

    assertions = [
      {
        assertion = cfg.secretKeyFiles != [ ] || cfg.unsigned;
        message = "services.narflow: no signing key: set services.narflow.secretKeyFiles, or services.narflow.unsigned = true to upload unsigned narinfos.";
      }
      {
        assertion = !(lib.any inStore cfg.secretKeyFiles);
        message = "services.narflow.secretKeyFiles: ${
          lib.concatMapStringsSep ", " toString (lib.filter inStore cfg.secretKeyFiles)
        } is in the Nix store, which every user can read: keep secret keys outside it (a string such as \"/run/keys/cache.sec\", not a path literal).";
      }
      {
        assertion = cfg.environmentFile == null || !(inStore cfg.environmentFile);
        message = "services.narflow.environmentFile: ${toString cfg.environmentFile} is in the Nix store, which every user can read: keep S3 credentials outside it.";
      }
      {
        assertion = lib.hasPrefix "s3://" cfg.to || lib.hasPrefix "file:///" cfg.to;
        message = "services.narflow.to: \"${cfg.to}\" is not a cache URL narflow uploads to: give s3://BUCKET?... or file:///ABSOLUTE/DIR.";
      }
      {
        assertion = !(lib.hasInfix "secret-key=" cfg.to);
        message = "services.narflow.to: the URL's secret-key= would be read outside systemd's credentials: give the key in services.narflow.secretKeyFiles instead.";
      }
      {
        assertion = !(settingsGiven "key-file");
        message = "services.narflow.settings.key-file: give secret keys in services.narflow.secretKeyFiles (passed as systemd credentials); the unit's --key-file flags would override this list.";
      }
      {
        assertion = settingsValue "socket" == socket && settingsValue "state-dir" == stateDir;
        message = "services.narflow.settings: socket must be ${socket} and state-dir ${stateDir}: they are the unit's RuntimeDirectory= and StateDirectory= (the only places it may write) and where narflow-hook looks.";
      }
      {
        assertion = !(settingsGiven "upload-journal") || settingsValue "upload-journal" == "off";
        message = "services.narflow.settings.upload-journal: the daemon records unfinished uploads in its queue; give \"off\" or nothing.";
      }
      {
        assertion = !cfg.openFirewall || cfg.metricsListen != null;
        message = "services.narflow.openFirewall: there is no port to open: set services.narflow.metricsListen (HOST:PORT).";
      }
      {
        assertion = cfg.metricsListen == null || builtins.match ".*:[0-9]+" cfg.metricsListen != null;
        message = "services.narflow.metricsListen: \"${toString cfg.metricsListen}\" is not HOST:PORT (an IP address and a port, e.g. 127.0.0.1:9464).";
      }
    ];

    warnings = lib.optional (cfg.openFirewall && metricsOnLoopback) "services.narflow.openFirewall: the metrics listen on loopback (${cfg.metricsListen}), which the firewall does not filter; opening port ${toString metricsPort} lets nothing in.";

    environment.etc."narflow/narflow.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    nix.settings = mkIf cfg.postBuildHook {
      post-build-hook = lib.getExe' cfg.package "narflow-hook";
    };

    networking.firewall.allowedTCPPorts = mkIf (cfg.openFirewall && metricsPort != null) [
      metricsPort
    ];

    systemd.services.narflow = {
      description = "narflow: upload Nix build outputs to a binary cache";
      wantedBy = [ "multi-user.target" ];
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        Type = "simple";
        # The config file by its store path: a change of settings changes the unit, and
        # NixOS restarts it. --config also makes a missing file an error.
        ExecStart = lib.concatStringsSep " " (
          [
            (lib.getExe' cfg.package "narflow")
            "daemon"
            "--config"
            "${configFile}"
          ]
          ++ map (k: "--key-file=%d/${k.name}") keyCredentials
        );
        LoadCredential = map (k: "${k.name}:${k.file}") keyCredentials;
        EnvironmentFile = lib.optional (cfg.environmentFile != null) (toString cfg.environmentFile);
        # Root, like the post-build-hook nix-daemon runs: it reads the Nix database and
        # store and owns the socket (0600) the hook talks to.
        User = "root";
        RuntimeDirectory = "narflow";
        StateDirectory = "narflow";
        StateDirectoryMode = "0700";
        # SIGTERM: the batch in flight finishes (or stays queued) within [daemon]
        # shutdown-timeout (60 s by default); keep TimeoutStopSec above it.
        KillSignal = "SIGTERM";
        TimeoutStopSec = 90;
        Restart = "always";
        RestartSec = 2;
        # Builds come first: uploads get a small share of CPU and disk when both are busy.
        CPUWeight = 20;
        IOWeight = 20;
        Nice = 10;
        # It writes only its state directory, its socket and (file://) the cache; the Nix
        # database file is read-only. The database directory stays writable for SQLite's
        # -wal and -shm files, which a read-only connection must create when Nix does not
        # have the database open.
        ProtectSystem = "strict";
        ReadWritePaths = [ "/nix/var/nix/db" ] ++ lib.optional (fileCacheDir != null) fileCacheDir;
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
        # Beyond the contrib unit: none of these takes anything narflow uses.
        ProtectKernelLogs = true;
        ProtectClock = true;
        ProtectHostname = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        SystemCallArchitectures = "native";
      };
    };
  };
}
