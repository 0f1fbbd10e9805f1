// Builds the demo page into clients/web/dist with esbuild (one bundle,
// app.js, beside index.html and style.css); with --serve, also serves it.
//
//   node build.mjs                         # build
//   node build.mjs --serve [--port 5173]   # build, serve on 127.0.0.1, rebuild on change
//
// Then open http://127.0.0.1:5173/?server=http://127.0.0.1:50051 with the
// suite running (`deploy/local/up`).

import { copyFile, mkdir } from "node:fs/promises";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, "dist");
const args = process.argv.slice(2);
const serve = args.includes("--serve");
const portArg = args.indexOf("--port");
const port = portArg >= 0 ? Number(args[portArg + 1]) : 5173;

await mkdir(dist, { recursive: true });
for (const file of ["index.html", "style.css"]) await copyFile(join(here, file), join(dist, file));
const options = {
  entryPoints: [join(here, "src/main.ts")],
  bundle: true,
  format: "esm",
  target: "es2022",
  sourcemap: true,
  minify: !serve,
  outfile: join(dist, "app.js"),
  logLevel: "warning",
};
if (serve) {
  const context = await esbuild.context(options);
  await context.watch();
  const { hosts, port: bound } = await context.serve({ servedir: dist, host: "127.0.0.1", port });
  // One line, read by test/browser.mjs.
  console.log(`serving http://${hosts[0]}:${bound}/`);
} else {
  const result = await esbuild.build({ ...options, metafile: true });
  const bytes = result.metafile.outputs[relative(process.cwd(), join(dist, "app.js"))].bytes;
  console.log(`built ${join(dist, "app.js")} (${Math.round(bytes / 1024)} KiB)`);
}
