module github.com/axoneme/axoneme/packages/l7-http/native

go 1.22
