// Scores cache-tests.fyi results: for each implementation, how many of
// the suite's required tests (kind "required" or unset, browser-only
// tests left out) it passed. Shoal's results come from the file given;
// the peers' are the ones the suite ships (results/*.json, published at
// cache-tests.fyi), scored over the same tests.
//   node score.mjs shoal-results.json
import fs from 'fs'
import path from 'path'
import { createRequire } from 'module'

const require = createRequire(import.meta.url)
const pkg = path.dirname(require.resolve('http-cache-tests/package.json'))
const { default: suites } = await import(path.join(pkg, 'tests/index.mjs'))
const { default: surrogate } = await import(path.join(pkg, 'tests/surrogate-control.mjs'))
suites.push(surrogate)

const required = []
const byId = new Map()
for (const suite of suites) {
  for (const test of suite.tests) {
    if (test.browser_only) continue
    byId.set(test.id, test)
    if (test.kind === undefined || test.kind === 'required') required.push(test.id)
  }
}

function score (results) {
  let pass = 0; let fail = 0; let untested = 0; let setup = 0
  const failed = []
  for (const id of required) {
    const r = results[id]
    if (r === undefined) untested++
    else if (r === true) pass++
    else if (Array.isArray(r) && r[0] === 'Setup') setup++
    else { fail++; failed.push(id) }
  }
  return { pass, fail, setup, untested, failed }
}

const shoal = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))
const rows = [['Shoal gateway', score(shoal)]]
for (const name of ['varnish', 'squid', 'trafficserver', 'nginx', 'apache', 'fastly']) {
  const file = path.join(pkg, 'results', `${name}.json`)
  if (fs.existsSync(file)) rows.push([name, score(JSON.parse(fs.readFileSync(file, 'utf8')))])
}
console.log(`Required tests (of cache-tests ${JSON.parse(fs.readFileSync(path.join(pkg, 'package.json'))).version}): ${required.length}`)
console.log('| implementation | passed | failed | setup failed | not run |')
console.log('|---|---|---|---|---|')
for (const [name, s] of rows) console.log(`| ${name} | ${s.pass} | ${s.fail} | ${s.setup} | ${s.untested} |`)
const mine = rows[0][1]
if (process.env.SHOW_FAILED !== '0') {
  console.log('\nShoal failed (required):')
  for (const id of mine.failed) console.log(`- ${id}: ${JSON.stringify(shoal[id]).slice(0, 200)}`)
}
