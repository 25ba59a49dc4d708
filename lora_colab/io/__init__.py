"""Reading checkpoints wherever they are, in layers that only talk to the one below:

byte sources (`local_file`, `http_file` over `http`; `locations` and `hub` say which to open), containers
(`safetensors`, `checkpoint`: single files, shards, folders, pickles), and `dequant` (fp8 scales);
`downloads` makes a source a local copy (Hub, URL, Drive). Everything above reads through `Checkpoint` and
never knows where the bytes come from. Imports only the root's shared modules (errors, dtypes).
"""
