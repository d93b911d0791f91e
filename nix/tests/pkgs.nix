# A stand-in `pkgs` for evaluating nix/module.nix without nixpkgs: the narflow package
# (a store path; nothing is built) and `formats.toml`, whose `generate` writes the TOML
# text to the store with builtins.toFile so that tests (and scripts/check-nix, with the
# real narflow binary) can read what the module renders.
{ lib }:
let
  # Values the TOML format takes; nested attribute sets are tables.
  valueType =
    lib.types.nullOr (
      lib.types.oneOf [
        lib.types.bool
        lib.types.int
        lib.types.float
        lib.types.str
        lib.types.path
        (lib.types.attrsOf valueType)
        (lib.types.listOf valueType)
      ]
    )
    // {
      description = "TOML value";
    };

  key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;
  scalar =
    v:
    if builtins.isBool v then
      lib.boolToString v
    else if builtins.isList v then
      "[" + lib.concatMapStringsSep ", " scalar v + "]"
    else if builtins.isString v || builtins.isPath v then
      builtins.toJSON (toString v)
    else
      toString v;
  # Key-value lines of a table, then its sub-tables as [a.b] sections.
  table =
    path: attrs:
    let
      names = lib.attrNames (lib.filterAttrs (_: v: v != null) attrs);
      isTable = n: builtins.isAttrs attrs.${n};
      plain = lib.filter (n: !isTable n) names;
      tables = lib.filter isTable names;
      header = lib.optionalString (path != [ ]) "[${lib.concatMapStringsSep "." key path}]\n";
    in
    header
    + lib.concatMapStrings (n: "${key n} = ${scalar attrs.${n}}\n") plain
    + lib.concatMapStrings (n: "\n" + table (path ++ [ n ]) attrs.${n}) tables;
in
{
  narflow = {
    type = "derivation";
    name = "narflow-0.1.0";
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-narflow-0.1.0";
    meta.mainProgram = "narflow";
  };

  formats.toml =
    { }:
    {
      type = lib.types.attrsOf valueType;
      generate = name: value: builtins.toFile name (table [ ] value);
    };
}
