# Tests of flake.nix's outputs, for lib.runTests: `outputs` is called with a stand-in
# nixpkgs (nixpkgs' lib, and a package set whose callPackage records what it was given),
# so the tests see each output without fetching nixpkgs or building anything.
{ lib }:
let
  flake = import ../../flake.nix;
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  pkgsFor =
    system:
    import ./pkgs.nix { inherit lib; }
    // {
      stdenv.hostPlatform = { inherit system; };
      callPackage = fn: args: {
        type = "derivation";
        name = "narflow-${system}";
        outPath = "${builtins.storeDir}/11111111111111111111111111111111-narflow-${system}";
        calledWith = {
          inherit fn args;
        };
        meta.mainProgram = "narflow";
      };
      mkShell = args: { shell = args; };
      testers.runNixOSTest = test: { vmTest = test; };
      clippy = "clippy";
      rustfmt = "rustfmt";
      rust-analyzer = "rust-analyzer";
      python3 = "python3";
      strace = "strace";
      valgrind = "valgrind";
    };
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs systems pkgsFor;
  };
  self = flake.outputs { inherit self nixpkgs; };
  x86 = "x86_64-linux";

  # nixosModules.default on an x86_64 system, enabled.
  machine =
    (lib.evalModules {
      modules = [
        ./stubs.nix
        self.nixosModules.default
        { _module.args.pkgs = pkgsFor x86; }
        {
          services.narflow = {
            enable = true;
            to = "s3://cache";
            unsigned = true;
          };
        }
      ];
    }).config;
in
{
  testPinnedToANixosRelease = {
    expr = flake.inputs.nixpkgs.url;
    expected = "github:NixOS/nixpkgs/nixos-26.11";
  };
  testPackagesCallThePackageExpression = {
    expr = lib.mapAttrs (_: p: {
      default = p.default.calledWith.fn;
      narflow = p.narflow.calledWith.fn;
    }) self.packages;
    expected = lib.genAttrs systems (_: {
      default = ../package.nix;
      narflow = ../package.nix;
    });
  };
  testOverlayAddsNarflow = {
    expr = (self.overlays.default (pkgsFor x86) { }).narflow.calledWith.fn;
    expected = ../package.nix;
  };
  testApps = {
    expr = self.apps.${x86}.default // {
      same = self.apps.${x86}.default == self.apps.${x86}.narflow;
    };
    expected = {
      type = "app";
      program = "${builtins.storeDir}/11111111111111111111111111111111-narflow-x86_64-linux/bin/narflow";
      meta.description = "narflow's command line";
      same = true;
    };
  };
  # The module runs the flake's own package, for the machine's system.
  testModuleUsesTheFlakesPackage = {
    expr = machine.systemd.services.narflow.serviceConfig.ExecStart;
    expected = "${builtins.storeDir}/11111111111111111111111111111111-narflow-x86_64-linux/bin/narflow daemon --config ${
      machine.environment.etc."narflow/narflow.toml".source
    }";
  };
  testDevShellBuildsThePackage = {
    expr = map (p: p.calledWith.fn) self.devShells.${x86}.default.shell.inputsFrom;
    expected = [ ../package.nix ];
  };
  testChecks = {
    expr = {
      package = self.checks.${x86}.package.calledWith.fn;
      vm = self.checks.${x86}.vm.vmTest.name;
    };
    expected = {
      package = ../package.nix;
      vm = "narflow";
    };
  };
}
