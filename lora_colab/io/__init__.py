"""Reading checkpoints wherever they are, in layers that only talk to the one below:

byte sources (`local_file`, `http_file` over `http`; `locations` and `hub` say which to open), containers
(`safetensors` headers, read and laid out; `checkpoint`: single files and shards; `pickles`; `gguf`),
`dequant` (fp8 and other quantized weights), and on top `opener` (`open_checkpoint`: a file, index, model or
pipeline folder to its container); `temporary` names each run's temporary files beside an output; `downloads`
makes a source a local copy (Hub, URL, Drive). Everything above reads through `Checkpoint` and never knows
where the bytes come from. Imports only the root's errors, dtypes and closeable.
"""
