module github.com/axoneme/axoneme/packages/cni/native

go 1.22
