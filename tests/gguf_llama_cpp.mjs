// Runs GGUF files in llama.cpp through node-llama-cpp (its prebuilt CPU binary), for tests/test_gguf.py.
// Usage: node tests/gguf_llama_cpp.mjs REQUEST.json, where the request is a list of
//   {"model": "model.gguf", "texts": ["..."], "prompt": [ids], "max_tokens": n}
// and prints one JSON line, a list of {"ids": [the ids of each text, special tokens parsed, no BOS added],
//   "greedy": [the max_tokens tokens llama.cpp generates greedily after the prompt ids]}.
// NODE_LLAMA_CPP_DIR names the folder where `npm i -E node-llama-cpp@3.21.1` was run.
import {readFileSync} from "node:fs";
import {createRequire} from "node:module";
import path from "node:path";
import {pathToFileURL} from "node:url";

const jobs = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(path.join(process.env.NODE_LLAMA_CPP_DIR, "package.json"));
const {getLlama} = await import(pathToFileURL(require.resolve("node-llama-cpp")).href);

const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const results = [];
for (const job of jobs) {
    const model = await llama.loadModel({modelPath: job.model});
    const ids = job.texts.map((text) => Array.from(model.tokenize(text, true)));
    // an f32 KV cache (llama.cpp's default is f16), so that the file's weights are all the rounding there is
    const context = await model.createContext({contextSize: job.prompt.length + job.max_tokens, threads: 1,
        experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32", flashAttention: false});
    const greedy = [];
    for await (const token of context.getSequence().evaluate(job.prompt, {temperature: 0})) {
        greedy.push(token);
        if (greedy.length >= job.max_tokens) break;
    }
    results.push({ids, greedy});
    await context.dispose();
    await model.dispose();
}
console.log(JSON.stringify(results));
await llama.dispose();
