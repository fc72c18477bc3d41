module example.invalid/godecoder

go 1.19
