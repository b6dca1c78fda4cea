//go:build tools

// Package tools pins the tools this module builds.
package tools

import _ "github.com/summerwind/h2spec/cmd/h2spec"
