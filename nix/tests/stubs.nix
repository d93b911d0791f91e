# Stand-in declarations of the NixOS options nix/module.nix sets, so that nixpkgs' own
# lib.evalModules can evaluate the module with no nixpkgs tree: each has the type NixOS
# gives it (lists concatenate, freeform settings merge), and nothing else is declared, so
# a misspelt or missing option is an evaluation error here as it is on NixOS.
{ lib, ... }:
let
  inherit (lib) mkOption types;
  # systemd's unit settings: a value or a list of them (NixOS' unitOption).
  unitValue = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
    (types.listOf (
      types.oneOf [
        types.str
        types.path
      ]
    ))
  ];
  service = types.submodule {
    options = {
      description = mkOption {
        type = types.str;
        default = "";
      };
      wantedBy = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      environment = mkOption {
        type = types.attrsOf types.str;
        default = { };
      };
      serviceConfig = mkOption {
        type = types.attrsOf unitValue;
        default = { };
      };
    };
  };
  etcFile = types.submodule {
    options = {
      source = mkOption { type = types.path; };
      mode = mkOption {
        type = types.str;
        default = "symlink";
      };
    };
  };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    environment.etc = mkOption {
      type = types.attrsOf etcFile;
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
    };
    nix.settings = mkOption {
      type = types.submodule { freeformType = types.attrsOf types.anything; };
      default = { };
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    systemd.services = mkOption {
      type = types.attrsOf service;
      default = { };
    };
  };
}
