// Command version stands in for the shoal binary in imagebuild's tests: a static program that
// prints the version it was built with when asked, as `shoal version` does.
package main

import (
	"fmt"
	"os"
)

var version = "dev"

func main() {
	if len(os.Args) == 2 && os.Args[1] == "version" {
		fmt.Println(version)
		return
	}
	os.Exit(2)
}
