"""One module per method, each exporting its `MethodSpec` (see `spec`); `registry` lists them.
`base` (the layer protocol) and `modules_to_save` hold what the methods share."""
